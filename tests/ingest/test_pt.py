"""The .pt/.pth ingestor, against files written by real torch (imported inside the tests)."""

from __future__ import annotations

import collections
import contextlib
import json
import os
import pickle
import re
import subprocess
import sys
import tracemalloc
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest
from polars.testing import assert_frame_equal
from typer.testing import CliRunner

import routelog
from routelog import api
from routelog.cli import app
from routelog.errors import InputError, UnsafeFileError
from routelog.ingest import Batch, FileInfo, _torchfile, pt
from routelog.options import Options, StepRange
from tests.conftest import REAL_LOGS, REPO, dirichlet
from tests.corpus import pt_cases
from tests.ingest import torchzip
from tests.ingest.torchzip import Pickle

runner = CliRunner()

pytestmark = pytest.mark.torch


def _torch() -> Any:
    return pytest.importorskip("torch")


def _save(obj: object, path: Path, **kwargs: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    _torch().save(obj, path, **kwargs)
    return path


def _read(path: Path, options: Options | None = None) -> tuple[list[Batch], FileInfo]:
    info = FileInfo(str(path), "pt")
    return list(pt.scan(path, options or Options(), info)), info


def _rows(batches: list[Batch]) -> pl.DataFrame:
    return pl.concat([b.frame for b in batches])


def _softmax(tensor: Any) -> np.ndarray:
    torch = _torch()
    probs: np.ndarray = torch.softmax(tensor.float(), dim=-1).numpy()
    return probs


def _fails(path: Path, *fragments: str, args: tuple[str, ...] = ()) -> str:
    """Analyze ``path`` through the CLI, expecting exit code 2 and one line naming the file."""
    result = runner.invoke(app, ["analyze", str(path), *args])
    assert result.exit_code == 2, result.output
    message = result.stderr
    assert message.startswith("routelog: error: "), message
    assert str(path) in message, message
    assert "Traceback" not in message
    for fragment in fragments:
        assert fragment in message, message
    return message


# --- payload shapes --------------------------------------------------------------------


@pytest.mark.parametrize("container", [tuple, list])
@pytest.mark.parametrize("batched", [False, True], ids=["[B*S,E]", "[B,S,E]"])
def test_hf_router_logits_round_trip(tmp_path: Path, container: type, batched: bool) -> None:
    torch = _torch()
    gen = torch.Generator().manual_seed(0)
    shape = (3, 5, 8) if batched else (15, 8)
    logits = [torch.randn(*shape, generator=gen) * 2 for _ in range(4)]
    path = _save({"step": 200, "router_logits": container(logits)}, tmp_path / "dump.pt")

    batches, info = _read(path)

    assert [b.frame["layer"][0] for b in batches] == [0, 1, 2, 3]
    assert all(b.n_experts == 8 and b.top_k is None for b in batches)
    assert info.rows == 4 * 15
    assert info.payload == "logits"
    assert info.layout.startswith(f"router_logits: {container.__name__} of 4 layer tensors")
    for batch, tensor in zip(batches, logits, strict=True):
        frame = batch.frame
        assert frame.schema["probs"] == pl.Array(pl.Float32, 8)
        assert frame["step"].to_list() == [200] * 15
        assert frame["token"].to_list() == list(range(15))
        flat = tensor.reshape(15, 8)
        np.testing.assert_allclose(frame["probs"].to_numpy(), _softmax(flat), rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(
            frame["logit_lse"].to_numpy(), torch.logsumexp(flat, -1).numpy(), rtol=1e-6
        )


def test_bare_tuple_of_tensors(tmp_path: Path) -> None:
    torch = _torch()
    logits = tuple(torch.randn(6, 4) for _ in range(2))
    batches, _ = _read(_save(logits, tmp_path / "step_42.pt"))
    frame = _rows(batches)
    assert frame["step"].unique().to_list() == [42]
    assert frame["layer"].to_list() == [0] * 6 + [1] * 6
    np.testing.assert_allclose(
        frame["probs"].to_numpy(), _softmax(torch.cat(logits)), rtol=1e-5, atol=1e-7
    )


def test_single_tensor_is_layer_zero(tmp_path: Path) -> None:
    torch = _torch()
    logits = torch.randn(10, 6)
    batches, info = _read(_save(logits, tmp_path / "step_1.pt"))
    assert len(batches) == 1
    assert batches[0].frame["layer"].unique().to_list() == [0]
    assert info.layout == "tensor [T, E] = [10, 6]"
    np.testing.assert_allclose(
        batches[0].frame["probs"].to_numpy(), _softmax(logits), rtol=1e-5, atol=1e-7
    )


def test_stacked_tensor_is_layers_tokens_experts(tmp_path: Path) -> None:
    torch = _torch()
    logits = torch.randn(3, 10, 6)
    batches, info = _read(_save({"step": 5, "logits": logits}, tmp_path / "x.pt"))
    assert [b.frame["layer"][0] for b in batches] == [0, 1, 2]
    assert info.layout == "logits: tensor [L, T, E] = [3, 10, 6]"
    for layer, batch in enumerate(batches):
        np.testing.assert_allclose(
            batch.frame["probs"].to_numpy(), _softmax(logits[layer]), rtol=1e-5, atol=1e-7
        )


@pytest.mark.parametrize(
    ("keys", "layers"),
    [
        ([0, 3, 5], [0, 3, 5]),
        (
            [f"model.layers.{i}.block_sparse_moe.gate" for i in (2, 7, 11)],
            [2, 7, 11],
        ),
    ],
    ids=["int keys", "module names"],
)
def test_dict_of_layers(tmp_path: Path, keys: list[object], layers: list[int]) -> None:
    torch = _torch()
    tensors = {key: torch.randn(7, 4) for key in keys}
    batches, _ = _read(_save({**tensors, "step": 9}, tmp_path / "layers.pth"))
    assert [b.frame["layer"][0] for b in batches] == layers
    for batch, tensor in zip(batches, tensors.values(), strict=True):
        np.testing.assert_allclose(
            batch.frame["probs"].to_numpy(), _softmax(tensor), rtol=1e-5, atol=1e-7
        )


@pytest.mark.parametrize("key", ["router_probs", "probs"])
def test_probabilities_under_their_own_name(tmp_path: Path, key: str) -> None:
    torch = _torch()
    probs = torch.softmax(torch.randn(12, 8), -1)
    batches, info = _read(_save({"step": 1, key: [probs]}, tmp_path / "p.pt"))
    assert info.payload == "probabilities"
    assert info.warnings == []
    assert "logit_lse" not in batches[0].frame.columns
    np.testing.assert_allclose(batches[0].frame["probs"].to_numpy(), probs.numpy(), rtol=1e-6)


def test_probabilities_under_router_logits_are_detected(tmp_path: Path) -> None:
    torch = _torch()
    probs = torch.softmax(torch.randn(2, 12, 8), -1)
    batches, info = _read(_save({"step": 1, "router_logits": tuple(probs)}, tmp_path / "p.pt"))
    assert info.payload == "probabilities"
    assert info.warnings == [
        "router_logits hold probabilities (softmax already applied); read as probabilities"
    ]
    assert "logit_lse" not in batches[0].frame.columns
    np.testing.assert_allclose(_rows(batches)["probs"].to_numpy(), probs.reshape(24, 8), rtol=1e-6)


def test_logits_that_happen_to_be_non_negative_stay_logits(tmp_path: Path) -> None:
    torch = _torch()
    logits = torch.rand(12, 8)  # non-negative but rows do not sum to 1
    _, info = _read(_save({"step": 1, "router_logits": (logits,)}, tmp_path / "p.pt"))
    assert info.payload == "logits"
    assert info.warnings == []


# --- dtypes and storage layouts ----------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "float64"])
def test_float_dtypes(tmp_path: Path, dtype: str) -> None:
    torch = _torch()
    logits = (torch.randn(64, 8) * 3).to(getattr(torch, dtype))
    batches, _ = _read(_save({"step": 3, "router_logits": (logits,)}, tmp_path / "d.pt"))
    # the values read are exactly the saved ones, so the only error is float32 rounding
    np.testing.assert_allclose(
        batches[0].frame["probs"].to_numpy(), _softmax(logits), rtol=1e-5, atol=1e-7
    )


def test_bfloat16_bits_are_widened_exactly(tmp_path: Path) -> None:
    torch = _torch()
    values = torch.tensor([[1.0, -2.5, 3.140625, 0.0], [1e-3, -1e30, 65504.0, -0.0]])
    loaded = _torchfile.load(_save(values.bfloat16(), tmp_path / "b.pt"))
    assert loaded.dtype == np.float32
    np.testing.assert_array_equal(loaded, values.bfloat16().float().numpy())


@pytest.mark.parametrize(
    "dtype", ["int64", "int32", "int16", "int8", "uint8", "bool", "float16", "float64"]
)
def test_other_dtypes_load_exactly(tmp_path: Path, dtype: str) -> None:
    torch = _torch()
    tensor = (torch.arange(-12, 12).reshape(4, 6) * 3).to(getattr(torch, dtype))
    loaded = _torchfile.load(_save({"t": tensor}, tmp_path / "i.pt"))["t"]
    assert loaded.dtype == tensor.numpy().dtype
    np.testing.assert_array_equal(loaded, tensor.numpy())


def test_views_of_a_bigger_storage(tmp_path: Path) -> None:
    """Offsets, strides and shared storages, as torch.save writes them (no copy on save)."""
    torch = _torch()
    big = torch.randn(10, 16)
    views = {
        "strided": big[:, ::2],
        "offset": big[3:7, 5:9],
        "transposed": big.t(),
        "row": big[4],
        "expanded": torch.randn(1, 6).expand(5, 6),
        "empty": big[2:2],
    }
    loaded = _torchfile.load(_save(views, tmp_path / "v.pt"))
    for name, view in views.items():
        assert loaded[name].shape == tuple(view.shape), name
        np.testing.assert_array_equal(loaded[name], view.numpy(), err_msg=name)
    assert not loaded["strided"].flags.writeable


def test_strided_payload_reads_like_its_copy(tmp_path: Path) -> None:
    torch = _torch()
    big = torch.randn(4, 20, 16)
    layers = (big[0, :, ::2], big[1, 2:18, 8:])
    batches, _ = _read(_save({"step": 1, "router_logits": layers}, tmp_path / "s.pt"))
    for batch, layer in zip(batches, layers, strict=True):
        np.testing.assert_allclose(
            batch.frame["probs"].to_numpy(), _softmax(layer.contiguous()), rtol=1e-5, atol=1e-7
        )


def test_storages_are_memory_mapped_not_copied(tmp_path: Path) -> None:
    torch = _torch()
    loaded = _torchfile.load(_save({"t": torch.randn(100, 8)}, tmp_path / "m.pt"))["t"]
    base = loaded
    while getattr(base, "base", None) is not None:  # through as_strided's DummyArray
        base = base.base
    assert isinstance(base, memoryview)
    assert type(base.obj).__name__ == "mmap"


def _legacy_and_zip(obj: object, directory: Path) -> tuple[Path, Path]:
    legacy = _save(obj, directory / "legacy.pt", _use_new_zipfile_serialization=False)
    return legacy, _save(obj, directory / "zip.pt")


def _same(a: Any, b: Any) -> None:
    """The same content, arrays equal in dtype, shape and values (bit for bit)."""
    assert type(a) is type(b)
    if isinstance(a, np.ndarray):
        assert (a.dtype, a.shape) == (b.dtype, b.shape)
        np.testing.assert_array_equal(a, b)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for key in a:
            _same(a[key], b[key])
    elif isinstance(a, list | tuple):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _same(x, y)
    else:
        assert a == b


def test_legacy_format_reads_like_the_zip_format(tmp_path: Path) -> None:
    """torch 2.13 writes both formats of the same tensors; routelog reads them alike: every
    dtype, views with offsets and strides, two tensors sharing one storage, a scalar, an
    empty tensor."""
    torch = _torch()
    torch.manual_seed(0)
    base = torch.randn(12, 8)
    obj = {
        "step": 3,
        "router_logits": (base[2:10], base[:, :4], base.t(), torch.randn(5, 8).bfloat16()),
        "more": [torch.randn(3, 4).half(), torch.randn(3, 4).double(), torch.arange(6)],
        "small": {"i": torch.arange(4, dtype=torch.int32), "b": torch.tensor([True, False])},
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 8),
        "bytes": torch.arange(5, dtype=torch.uint8),
        "chars": torch.arange(-2, 2, dtype=torch.int8),
        "short": torch.arange(3, dtype=torch.int16),
    }
    legacy, archive = _legacy_and_zip(obj, tmp_path)
    assert not zipfile.is_zipfile(legacy)
    _same(_torchfile.load(legacy), _torchfile.load(archive))
    ids = {"step": 1, "router_logits": (base,), "topk_ids": (base.topk(2).indices,)}
    legacy, archive = _legacy_and_zip(ids, tmp_path / "ids")
    got = [routelog.analyze([str(p)]).metrics.drop("run") for p in (legacy, archive)]
    assert_frame_equal(got[0], got[1])


def test_legacy_format_needs_no_torch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    torch = _torch()
    logits = torch.randn(9, 4).bfloat16()
    legacy, archive = _legacy_and_zip({"step": 2, "router_logits": (logits,)}, tmp_path)
    expected = _softmax(logits)
    monkeypatch.setitem(sys.modules, "torch", None)  # importing torch now fails
    batches, _ = _read(legacy)
    np.testing.assert_allclose(batches[0].frame["probs"].to_numpy(), expected, rtol=1e-5, atol=1e-7)
    assert_frame_equal(_rows(batches), _rows(_read(archive)[0]))


def test_hand_made_legacy_files_read_by_torch_alike(tmp_path: Path) -> None:
    """The corpus's pre-zip writer lays files out as torch does: torch 2.13 reads its valid
    file to the same arrays as routelog."""
    torch = _torch()
    path = tmp_path / "legacy_valid.pt"
    next(c for c in pt_cases.CASES if c.name == path.name).write(path)
    theirs = torch.load(path, weights_only=True)
    ours = _torchfile.load(path)
    assert ours["step"] == theirs["step"]
    for a, b in zip(ours["router_logits"], theirs["router_logits"], strict=True):
        np.testing.assert_array_equal(a, b.numpy())


def test_legacy_storages_are_memory_mapped(tmp_path: Path) -> None:
    torch = _torch()
    path = _save(
        {"t": torch.randn(100, 8)}, tmp_path / "m.pt", _use_new_zipfile_serialization=False
    )
    base = _torchfile.load(path)["t"]
    while getattr(base, "base", None) is not None:
        base = base.base
    assert type(base.obj).__name__ == "mmap"


# --- attention mask, step, top_k, selection ----------------------------------------------


def test_attention_mask_masks_padding(tmp_path: Path) -> None:
    torch = _torch()
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]])
    logits = tuple(torch.randn(2, 5, 8) for _ in range(3))
    path = _save({"step": 1, "router_logits": logits, "attention_mask": mask}, tmp_path / "m.pt")
    batches, info = _read(path)
    assert info.rows == 3 * 10
    assert info.masked_rows == 3 * 3
    kept = [0, 1, 2, 5, 6, 7, 8]
    for batch, tensor in zip(batches, logits, strict=True):
        assert batch.frame["token"].to_list() == kept
        expected = _softmax(tensor.reshape(10, 8))[kept]
        np.testing.assert_allclose(batch.frame["probs"].to_numpy(), expected, rtol=1e-5, atol=1e-7)
    summary = api.analyze([str(path)]).runs[0].summary()
    assert (summary["rows"], summary["masked_rows"]) == (30, 9)


def test_step_in_payload_wins_over_the_name_with_a_warning(tmp_path: Path) -> None:
    torch = _torch()
    path = _save({"step": 200, "router_logits": (torch.randn(4, 4),)}, tmp_path / "step_100.pt")
    batches, info = _read(path)
    assert batches[0].frame["step"].unique().to_list() == [200]
    assert info.warnings == ["step 200 in the file differs from step 100 in its name; using 200"]


def test_step_as_tensor_and_agreeing_name(tmp_path: Path) -> None:
    torch = _torch()
    path = _save(
        {"step": torch.tensor(100), "router_logits": (torch.randn(4, 4),)}, tmp_path / "step_100.pt"
    )
    batches, info = _read(path)
    assert batches[0].frame["step"].unique().to_list() == [100]
    assert info.warnings == []


def test_step_from_the_name(tmp_path: Path) -> None:
    torch = _torch()
    path = _save({"router_logits": (torch.randn(4, 4),)}, tmp_path / "global_step300" / "r.pt")
    batches, _ = _read(path)
    assert batches[0].frame["step"].unique().to_list() == [300]


def test_top_k_from_payload_is_used(tmp_path: Path) -> None:
    torch = _torch()
    logits = torch.randn(200, 8)
    path = _save({"step": 1, "router_logits": (logits,), "top_k": 2}, tmp_path / "k.pt")
    batches, _ = _read(path)
    assert batches[0].top_k == 2
    metrics = api.analyze([str(path)]).metrics
    assert metrics["top_k"].to_list() == [2]
    counts = np.bincount(torch.topk(logits, 2).indices.reshape(-1).numpy(), minlength=8)
    assert metrics["max_load_share"][0] == pytest.approx(counts.max() / 400)


def test_a_stated_top_k_above_e_is_the_files_error(tmp_path: Path) -> None:
    torch = _torch()
    path = _save({"step": 1, "router_logits": (torch.randn(16, 8),), "top_k": 9}, tmp_path / "k.pt")
    with pytest.raises(InputError, match=r"k.pt: the file states top_k=9, more than E=8"):
        api.analyze([str(path)])
    assert api.analyze([str(path)], top_k=2).metrics["top_k"].to_list() == [2]  # the option wins


def test_layer_and_step_selection(tmp_path: Path) -> None:
    torch = _torch()
    path = _save({"step": 50, "router_logits": tuple(torch.randn(3, 8, 4))}, tmp_path / "s.pt")
    batches, info = _read(path, Options(layers=frozenset({1, 2})))
    assert [b.frame["layer"][0] for b in batches] == [1, 2]
    assert info.rows == 24
    batches, _ = _read(path, Options(steps=StepRange(60, None)))
    assert batches == []


def test_large_layers_come_in_bounded_batches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch = _torch()
    monkeypatch.setattr(pt, "BATCH_ROWS", 7)
    logits = torch.randn(20, 4)
    mask = torch.ones(20, dtype=torch.int64)
    mask[[3, 8, 15]] = 0
    path = _save({"step": 1, "router_logits": (logits,), "attention_mask": mask}, tmp_path / "b.pt")
    batches, _ = _read(path)
    assert [b.frame.height for b in batches] == [6, 6, 5]
    frame = _rows(batches)
    kept = [t for t in range(20) if t not in (3, 8, 15)]
    assert frame["token"].to_list() == kept
    np.testing.assert_allclose(frame["probs"].to_numpy(), _softmax(logits)[kept], rtol=1e-5)


def test_run_directory_of_pt_and_pth(tmp_path: Path) -> None:
    torch = _torch()
    run = tmp_path / "run"
    _save({"router_logits": (torch.randn(8, 4),)}, run / "step_10.pt")
    _save({"router_logits": (torch.randn(8, 4),)}, run / "sub" / "step_20.pth")
    (run / "notes.txt").write_text("not a log")
    analysis = api.analyze([str(run)])
    assert analysis.metrics["step"].to_list() == [10, 20]
    assert analysis.runs[0].summary()["ignored_files"] == [str(run / "notes.txt")]
    assert [f.format for f in analysis.runs[0].files] == ["pt", "pt"]


# --- the real logs -----------------------------------------------------------------------


def _reference_metrics(run: Path, k: int) -> pl.DataFrame:
    """Metrics by hand: torch.load + torch.softmax + numpy, one (step, layer) at a time."""
    torch = _torch()
    rows = []
    for path in sorted(run.glob("*.pt")):
        content = torch.load(path, weights_only=True)
        for layer, logits in enumerate(content["router_logits"]):
            probs = torch.softmax(logits.double(), dim=-1).numpy()
            n, e = probs.shape
            ids = torch.topk(torch.from_numpy(probs), k, dim=-1).indices.numpy()
            counts = np.bincount(ids.reshape(-1), minlength=e)
            share = counts / counts.sum()
            mean = probs.mean(axis=0)
            with np.errstate(divide="ignore", invalid="ignore"):
                token_h = -np.nansum(probs * np.log(probs), axis=1).mean()
                assign_h = -np.nansum(share * np.log(share))
            rows.append(
                {
                    "step": content["step"],
                    "layer": layer,
                    "n_tokens": n,
                    "token_entropy": token_h,
                    "load_entropy": -(mean * np.log(mean)).sum(),
                    "assign_entropy": assign_h,
                    "max_load_share": share.max(),
                    # dead: almost no tokens, or almost no probability mass
                    "dead_experts": int(((share < 0.1 / e) | (mean < 0.1 / e)).sum()),
                    "aux_loss": e * ((counts / n) * mean).sum(),
                    "top1_prob": probs.max(axis=1).mean(),
                    "z_loss": (torch.logsumexp(logits.double(), -1) ** 2).mean().item(),
                    "mass_share": mean.tolist(),
                    "top1_share": (np.bincount(probs.argmax(axis=1), minlength=e) / n).tolist(),
                }
            )
    return pl.DataFrame(rows)


@pytest.mark.real_logs
@pytest.mark.parametrize("run", ["collapse", "aux-loss"])
def test_real_logs_match_torch(run: str) -> None:
    result = runner.invoke(
        app, ["analyze", str(REAL_LOGS / run), "--top-k", "2", "--format", "json"]
    )
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    got = pl.DataFrame(document["metrics"]).sort("step", "layer")
    expected = _reference_metrics(REAL_LOGS / run, 2).sort("step", "layer")
    assert got.height == expected.height == 16 * 4
    assert got["step"].to_list() == expected["step"].to_list()
    assert got["n_tokens"].to_list() == [1024] * 64
    assert got["dead_experts"].to_list() == expected["dead_experts"].to_list()
    for name in ("mass_share", "top1_share"):
        np.testing.assert_allclose(
            np.array(got[name].to_list()), np.array(expected[name].to_list()), atol=1e-6
        )
    for name in [c for c in expected.columns[3:] if c not in ("mass_share", "top1_share")]:
        np.testing.assert_allclose(
            got[name].to_numpy(), expected[name].to_numpy(), rtol=1e-4, atol=1e-5, err_msg=name
        )


@pytest.mark.real_logs
def test_real_logs_read_without_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    with pytest.raises(ImportError):
        import torch  # noqa: F401
    result = runner.invoke(app, ["analyze", str(REAL_LOGS / "collapse"), "--top-k", "2"])
    assert result.exit_code == 0, result.output
    assert "16 logged" in result.stdout


def test_zip_file_read_without_torch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    torch = _torch()
    logits = torch.randn(2, 6, 4).bfloat16()
    path = _save({"step": 7, "router_logits": tuple(logits)}, tmp_path / "z.pt")
    expected = _softmax(logits.reshape(12, 4))
    monkeypatch.setitem(sys.modules, "torch", None)
    batches, _ = _read(path)
    np.testing.assert_allclose(_rows(batches)["probs"].to_numpy(), expected, rtol=1e-5, atol=1e-7)


def test_reading_never_imports_torch(tmp_path: Path) -> None:
    torch = _torch()
    path = _save({"step": 1, "router_logits": (torch.randn(8, 4),)}, tmp_path / "t.pt")
    code = (
        "import sys\n"
        "from routelog import api\n"
        f"result = api.analyze([{str(path)!r}])\n"
        "assert result.metrics.height == 1\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr


# --- bad input: exit code 2, one line naming the file ----------------------------------


def test_not_a_zip(tmp_path: Path) -> None:
    path = tmp_path / "step_1.pt"
    path.write_bytes(b"this is not a checkpoint\n")
    _fails(path, "not a PyTorch file")


def test_truncated_zip(tmp_path: Path) -> None:
    torch = _torch()
    whole = tmp_path / "whole.pt"
    torch.save({"step": 1, "router_logits": (torch.zeros(64, 8),)}, whole)
    path = tmp_path / "step_1.pt"
    path.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    _fails(path, "truncated or corrupt zip archive")


def test_zip_without_data_pkl(tmp_path: Path) -> None:
    path = tmp_path / "step_1.pt"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("notes.txt", "hello")
    _fails(path, "no data.pkl")


class _Custom:
    """A class no routing dump should hold."""

    def __init__(self) -> None:
        self.value = 1


@pytest.mark.parametrize(
    ("payload", "refused"),
    [
        (collections.Counter({"a": 1}), "collections.Counter"),
        (_Custom(), f"{__name__}._Custom"),
    ],
    ids=["Counter", "custom class"],
)
def test_unknown_class_is_refused(tmp_path: Path, payload: object, refused: str) -> None:
    path = _save({"step": 1, "router_logits": payload}, tmp_path / "u.pt")
    message = _fails(path, f"refused to load global {refused}")
    with pytest.raises(UnsafeFileError):
        _torchfile.load(path)
    assert "nothing was run" in message


def test_legacy_format_with_unknown_class(tmp_path: Path) -> None:
    path = _save(
        {"step": 1, "router_logits": _Custom()},
        tmp_path / "legacy.pt",
        _use_new_zipfile_serialization=False,
    )
    _fails(path, f"refused to load global {__name__}._Custom", "nothing was run")


class _Evil:
    """Unpickling this calls ``function(*args)``: what a malicious checkpoint does."""

    def __init__(self, function: object, *args: object) -> None:
        self.function = function
        self.args = args

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        return self.function, self.args


def _hand_made_checkpoint(path: Path, obj: object) -> Path:
    """A zip laid out like torch.save's, with ``data.pkl`` pickled by plain pickle."""
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", pickle.dumps(obj, protocol=2))
        archive.writestr("archive/byteorder", "little")
        archive.writestr("archive/version", "3\n")
    return path


@pytest.mark.parametrize(
    "make",
    [
        lambda marker: (_Evil(os.system, f"touch {marker}"), f"{os.system.__module__}.system"),
        lambda marker: (
            _Evil(eval, f"open({str(marker)!r}, 'w').close()"),
            "builtins.eval",
        ),
        lambda marker: (
            {"step": 1, "router_logits": [_Evil(subprocess.call, ["touch", str(marker)])]},
            "subprocess.call",
        ),
    ],
    ids=["os.system", "builtins.eval", "subprocess.call"],
)
def test_malicious_pickle_runs_nothing(tmp_path: Path, make: Any) -> None:
    marker = tmp_path / "pwned"
    obj, refused = make(marker)
    path = _hand_made_checkpoint(tmp_path / "step_1.pt", obj)
    with pytest.raises(UnsafeFileError, match=f"refused to load global {refused}"):
        _torchfile.load(path)
    _fails(path, f"refused to load global {refused}")
    assert not marker.exists()


def test_crafted_tensor_outside_its_storage(tmp_path: Path) -> None:
    """A storage shorter than its tensors claim (hand-edited file) is an error, not a read."""
    torch = _torch()
    good = _save({"step": 1, "router_logits": (torch.randn(16, 4),)}, tmp_path / "good.pt")
    bad = tmp_path / "step_1.pt"
    with zipfile.ZipFile(good) as source, zipfile.ZipFile(bad, "w") as target:
        for info in source.infolist():
            data = source.read(info)
            if info.filename.endswith("data/0"):
                data = data[:100]
            target.writestr(info, data)
    _fails(bad, "cannot read the torch archive", "storage '0' holds 100 bytes")


def test_unknown_structure(tmp_path: Path) -> None:
    path = _save({"step": 1, "weights": [1, 2, 3]}, tmp_path / "step_1.pt")
    _fails(
        path,
        "expected a tensor, a list of tensors or a dict with router_logits; "
        "found dict with keys 'step', 'weights'",
    )


def test_list_of_non_tensors(tmp_path: Path) -> None:
    path = _save({"step": 1, "router_logits": [1.0, 2.0]}, tmp_path / "step_1.pt")
    _fails(path, "found list of 2 items (float)")


def test_integer_payload(tmp_path: Path) -> None:
    torch = _torch()
    path = _save(
        {"step": 1, "router_logits": (torch.ones(4, 8, dtype=torch.int64),)}, tmp_path / "i.pt"
    )
    _fails(path, "layer 0 tensor holds int64 values")


def test_attention_mask_of_the_wrong_size(tmp_path: Path) -> None:
    torch = _torch()
    path = _save(
        {"step": 1, "router_logits": (torch.randn(10, 4),), "attention_mask": torch.ones(2, 4)},
        tmp_path / "m.pt",
    )
    _fails(path, "attention_mask [2, 4] covers 8 tokens, but layer 0 has 10 rows")


@pytest.mark.parametrize("value", [float("nan"), 0.5, -1.0, 2.0])
def test_an_attention_mask_of_other_values(tmp_path: Path, value: float) -> None:
    torch = _torch()
    mask = torch.ones(2, 4)
    mask[1, 2] = value  # token 6: neither padding (0) nor a token (1)
    logits = (torch.randn(8, 4),)
    path = _save({"step": 1, "router_logits": logits, "attention_mask": mask}, tmp_path / "m.pt")
    _fails(path, f"attention_mask holds {value!r} at token 6: expected 0 (padding) or 1")


def test_no_step_anywhere(tmp_path: Path) -> None:
    torch = _torch()
    path = _save({"router_logits": (torch.randn(4, 4),)}, tmp_path / "router.pt")
    _fails(path, "no 'step' in the payload, and no step in the file name")


def test_non_finite_logits_name_layer_and_row(tmp_path: Path) -> None:
    torch = _torch()
    logits = torch.randn(6, 4)
    logits[4, 2] = float("nan")
    path = _save({"step": 1, "router_logits": (torch.randn(6, 4), logits)}, tmp_path / "n.pt")
    _fails(path, "layer 1 row 4: non-finite logit")
    result = runner.invoke(app, ["analyze", str(path), "--skip-bad-rows", "--format", "json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["runs"][0]["skipped_rows"] == 1


def test_bad_probabilities_under_probs(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    torch = _torch()
    probs = torch.from_numpy(dirichlet(rng, 5, 4).astype(np.float32))
    probs[2] *= 2
    path = _save({"step": 1, "probs": [probs]}, tmp_path / "p.pt")
    _fails(path, "layer 0 row 2: probabilities do not sum to 1")


def test_duplicate_layer_keys(tmp_path: Path) -> None:
    torch = _torch()
    path = _save(
        {"step": 1, "layers.1.gate": torch.randn(4, 4), "blocks.1.router": torch.randn(4, 4)},
        tmp_path / "d.pt",
    )
    _fails(path, "keys 'layers.1.gate' and 'blocks.1.router' both name layer 1")


# --- hostile files: the stand-ins are immutable, views and resources bounded ----------
# (every file below is also in tests/corpus/pt/, run through the CLI by tests/test_corpus.py)


def _case(name: str, directory: Path) -> Path:
    case = next(c for c in [*pt_cases.CASES, pt_cases.NEG_INF_F64] if c.name == name)
    path = directory / f"step_1_{name}"
    case.write(path)
    return path


def test_build_on_a_storage_is_refused(tmp_path: Path) -> None:
    """The audit's out-of-bounds read: BUILD swaps a storage's data for a stride-0 view that
    claims 256 elements of a one-element storage; the old reader then computed metrics from
    the 1 KB that follow storage 0 in the file (other members, the zip directory)."""
    path = _case("build_storage_values.pt", tmp_path)
    with pytest.raises(UnsafeFileError, match=r"refused to set the state of a storage"):
        _torchfile.load(path)
    _fails(path, "refused to set the state of a storage (pickle BUILD; nothing was run)")


@pytest.mark.parametrize(
    ("name", "what"),
    [
        ("build_storage_numel.pt", "storage"),
        ("build_tensor.pt", "tensor"),
        ("build_rebuilder.pt", "tensor rebuilder"),
    ],
)
def test_build_on_any_stand_in_is_refused(tmp_path: Path, name: str, what: str) -> None:
    with pytest.raises(UnsafeFileError, match=f"refused to set the state of a {what} "):
        _torchfile.load(_case(name, tmp_path))


@pytest.mark.parametrize(
    "code", [pickle.SETITEM, pickle.APPEND, pickle.BUILD], ids=["SETITEM", "APPEND", "BUILD"]
)
def test_storage_cannot_be_altered_by_any_opcode(tmp_path: Path, code: bytes) -> None:
    """Item assignment, append and BUILD on a storage all fail: nothing is changed."""
    p = Pickle().storage("0", 64)
    if code == pickle.SETITEM:
        p.text("numel").int(10**6)
    elif code == pickle.APPEND:
        p.int(1)
    else:
        p.raw(pickle.EMPTY_DICT).text("numel").int(10**6).raw(pickle.SETITEM)
    path = torchzip.write(tmp_path / "step_1.pt", p.raw(code).done(), {"0": bytes(256)})
    with pytest.raises(InputError):
        _torchfile.load(path)


def test_build_on_a_plain_ordered_dict_still_works(tmp_path: Path) -> None:
    """A plain container may carry attributes (BUILD on an OrderedDict instance)."""
    p = Pickle().global_("collections", "OrderedDict").raw(pickle.EMPTY_TUPLE + pickle.REDUCE)
    p.raw(pickle.EMPTY_DICT).text("note").int(1).raw(pickle.SETITEM + pickle.BUILD)
    loaded = _torchfile.load(torchzip.write(tmp_path / "o.pt", p.done(), {}))
    assert loaded == collections.OrderedDict()


@pytest.mark.parametrize(
    ("name", "message"),
    [(c.name, c.stderr) for c in pt_cases.CASES if c.name.startswith(("view_", "storage_"))],
)
def test_views_are_checked_against_their_storage(tmp_path: Path, name: str, message: str) -> None:
    with pytest.raises(InputError, match=re.escape(message)):
        _torchfile.load(_case(name, tmp_path))


def test_views_reach_exactly_the_last_element(tmp_path: Path) -> None:
    """The bound is exact: a view ending on the storage's last element reads; one past fails."""
    values = np.arange(64, dtype="<f4")
    for offset, ok in ((0, True), (1, False)):
        p = Pickle().tensor("0", 64, offset, (4, 4, 4), (16, 4, 1))
        path = torchzip.write(tmp_path / f"v{offset}.pt", p.done(), {"0": values.tobytes()})
        if ok:
            np.testing.assert_array_equal(_torchfile.load(path), values.reshape(4, 4, 4))
        else:
            with pytest.raises(InputError, match="tensor reaches element 64 of a storage of 64"):
                _torchfile.load(path)


def test_repeated_views_are_one_array(tmp_path: Path) -> None:
    """100,000 rebuild calls of one view make one record and one array, not 100,000."""
    path = _case("references_100k_calls.pt", tmp_path)
    loaded = _torchfile.load(path)["router_logits"]
    assert len(loaded) == 100_000
    assert all(item is loaded[0] for item in loaded)
    _fails(path, "100000 layer tensors; routelog reads at most 1024 per file")


def test_broadcast_views_are_bounded_by_the_file_size(tmp_path: Path) -> None:
    path = _case("broadcast_10_12.pt", tmp_path)
    with pytest.raises(InputError, match="tensors claim more than 16777216 elements in all"):
        _torchfile.load(path)
    ok = _torchfile.load(_case("valid_broadcast.pt", tmp_path))["router_logits"][0]
    assert ok.shape == (8, 4)
    assert ok.strides == (0, 4)
    np.testing.assert_array_equal(ok, np.broadcast_to(ok[0], (8, 4)))


def test_one_tensor_as_many_layers_is_bounded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Few layers of one tensor read; as many as the budget allows, no more."""
    path = _case("references_100k_memo.pt", tmp_path)
    _fails(path, "100000 layer tensors")
    monkeypatch.setattr(pt, "MAX_LAYERS", 10**6)
    monkeypatch.setattr(_torchfile, "VIEW_FLOOR", 1000)
    _fails(path, "its layer tensors hold 6400000 values in all, more than the")


@pytest.mark.parametrize(
    "name",
    [
        "zipbomb.pt",
        "broadcast_10_12.pt",
        "references_100k_calls.pt",
        "memo_2_28.pt",
        "objects_1m.pt",
    ],
)
def test_hostile_files_allocate_little(tmp_path: Path, name: str) -> None:
    """Refused before allocating what they claim (96 MiB, 4 TB, 100,000 copies, 2 GiB of
    memo): the peak of Python and numpy allocations while reading stays under 16 MiB."""
    path = _case(name, tmp_path)
    tracemalloc.start()
    try:
        with pytest.raises(InputError):
            _read(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20, peak


def test_zip_bomb_is_refused_before_inflating(tmp_path: Path) -> None:
    path = _case("zipbomb.pt", tmp_path)
    assert path.stat().st_size < 200_000
    _fails(path, "compressed member expands beyond 64.0 MiB", "archive/data/0")


def test_deflated_members_read_like_stored_ones(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    storages = {str(i): rng.standard_normal(16 * 4).astype("<f4").tobytes() for i in range(2)}
    data = torchzip.router_pickle(2, 16, 4).done()
    stored = _torchfile.load(torchzip.write(tmp_path / "s.pt", data, storages))
    deflated = _torchfile.load(torchzip.write(tmp_path / "d.pt", data, storages, compress=True))
    for a, b in zip(stored["router_logits"], deflated["router_logits"], strict=True):
        np.testing.assert_array_equal(a, b)


def test_memo_index_beyond_the_pickle(tmp_path: Path) -> None:
    _fails(_case("memo_2_28.pt", tmp_path), "data.pkl names memo entry 268435456 but holds only")


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("nested_1000.pt", "nested deeper than 64 levels"),
        ("objects_1m.pt", "data.pkl holds more than 524288 opcodes"),
        ("cycle.pt", "a list that contains itself"),
        ("exponential_60.pt", "found list of 2 items (list)"),
        ("binbytes8_2_40.pt", "BINBYTES8 at byte"),
        ("opcode_ext1.pt", "refused pickle opcode EXT1"),
        ("global_escapes.pt", "refused to load global \\x1b[2Jos.system\\x07 ("),
        ("pickle_without_stop.pt", "ends before its STOP opcode"),
    ],
)
def test_hostile_pickle_structures(tmp_path: Path, name: str, message: str) -> None:
    _fails(_case(name, tmp_path), message)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("step_2_70.pt", "'step' is 1180591620717411303424, beyond int64"),
        ("top_k_2_64.pt", "'top_k' is 18446744073709551616, beyond int64"),
        ("layer_key_2_40.pt", "key 1099511627776 names layer 1099511627776, beyond int32"),
        ("layer_name_2_31.pt", "names layer 2147483648, beyond int32"),
        ("layer_name_5000_digits.pt", "names a layer of 5000 digits, beyond int32"),
    ],
)
def test_integers_beyond_their_type_exit_2(tmp_path: Path, name: str, message: str) -> None:
    _fails(_case(name, tmp_path), message)


def test_step_beyond_int64_in_the_file_name(tmp_path: Path) -> None:
    data = torchzip.router_pickle(1, 16, 4, step=None).done()
    path = torchzip.write(tmp_path / "step_99999999999999999999.pt", data, {"0": bytes(256)})
    _fails(path, "the step 99999999999999999999 in the name", "does not fit a 64-bit integer")


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("two_data_pkl.pt", "holds 2 data.pkl members (archive/data.pkl, other/data.pkl)"),
        ("data_pkl_twice.pt", "holds 2 data.pkl members (archive/data.pkl, archive/data.pkl)"),
        ("storage_member_twice.pt", "member archive/data/0 appears 2 times"),
        ("bzip2_member.pt", "uses zip compression method 12"),
        ("zip_sizes_lie.pt", "storage '0' inflates to fewer bytes"),
    ],
)
def test_odd_zip_layouts(tmp_path: Path, name: str, message: str) -> None:
    _fails(_case(name, tmp_path), message)


def test_float64_and_minus_inf_reach_the_validation_unchanged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The .pt path hands float64 logits, -inf included, as they are to the shared check."""
    path = _case("valid_neg_inf_f64.pt", tmp_path)
    seen: list[np.ndarray] = []
    real = pt.to_probabilities

    def spy(matrix: np.ndarray, *args: Any) -> Any:
        seen.append(np.array(matrix))
        return real(matrix, *args)

    monkeypatch.setattr(pt, "to_probabilities", spy)
    with contextlib.suppress(InputError):  # accepting -inf is the shared validation's call
        _read(path)
    expected = np.random.default_rng(3).standard_normal((16, 4))
    expected[::2, 1] = -np.inf
    assert seen[0].dtype == np.float64
    np.testing.assert_array_equal(seen[0], expected)


def test_a_nan_of_the_other_byte_order_is_the_one_line_error(tmp_path: Path) -> None:
    import warnings
    import zipfile

    torch = _torch()
    logits = torch.randn(16, 8)
    logits.view(torch.int32)[3, 2] = 0x7F800001  # a signalling NaN
    little = _save({"step": 3, "router_logits": (logits,)}, tmp_path / "le.pt")
    big = tmp_path / "be.pt"
    with zipfile.ZipFile(little) as source, zipfile.ZipFile(big, "w") as target:
        for item in source.infolist():
            data = source.read(item)
            if item.filename.endswith("byteorder"):
                data = b"big"
            elif "/data/" in item.filename:
                data = np.frombuffer(data, "<u4").astype(">u4").tobytes()
            target.writestr(item.filename, data)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no numpy warning on the way to the error
        with pytest.raises(InputError, match=r"be.pt layer 0 row 3: non-finite logit"):
            api.analyze([str(big)], top_k=2)
