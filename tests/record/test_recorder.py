"""The Recorder's contract on small hand-made torch models: steps, limits, probes, ranks,
the writer queue, and loud failures (no router, wrong E, silent layers, config mismatch)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest
from scipy.special import softmax
from typer.testing import CliRunner

import routelog
from routelog.cli import app
from routelog.errors import MissingExtraError, RecordError
from routelog.ingest.payload import step_from_name
from tests.conftest import REPO
from tests.record.models import mixtral

pytestmark = pytest.mark.torch
torch = pytest.importorskip("torch")
nn = torch.nn

from routelog.record import Adapter, Recorder, recorder, writer  # noqa: E402

runner = CliRunner()
E, H = 4, 8


class Moe(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate = nn.Linear(H, E, bias=False)


class Layer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.moe = Moe()


class Toy(nn.Module):
    """Two MoE layers whose gates return logits; ``skip`` makes layer 1 stop running."""

    def __init__(self, layers: int = 2) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(Layer() for _ in range(layers))
        self.skip = False

    def forward(self, x: Any) -> Any:
        out = []
        for i, layer in enumerate(self.layers):
            if self.skip and i == 1:
                continue
            out.append(layer.moe.gate(x.reshape(-1, H)))
        return torch.stack(out)


ROUTERS = {"layers.*.moe.gate": "logits"}


@pytest.fixture
def out(tmp_path: Path) -> Path:
    """A run directory (tmp_path itself holds the isolated project's .git)."""
    return tmp_path / "run"


def _toy_recorder(path: Path, **kwargs: Any) -> tuple[Toy, Recorder]:
    model = Toy()
    return model, Recorder(model, path, routers=ROUTERS, top_k=2, **kwargs)


def test_custom_routers_by_name_round_trip(out: Path) -> None:
    model, rec = _toy_recorder(out, every=1)
    x = torch.randn(3, 5, H)
    with rec:
        rec.step(0)
        logits = model(x)
    assert rec.layers == [0, 1]
    metrics = routelog.analyze([out]).metrics.sort("layer")
    for row, layer_logits in zip(metrics.iter_rows(named=True), logits, strict=True):
        probs = softmax(layer_logits.detach().double().numpy(), axis=1)
        ids = np.argsort(-probs, axis=1)[:, :2]
        counts = np.bincount(ids.ravel(), minlength=E)
        assert row["n_tokens"] == 15
        assert row["top_k"] == 2
        assert row["max_load_share"] == pytest.approx(counts.max() / counts.sum())
        assert row["selection_mismatch"] == 0.0


def test_every_and_step_files(out: Path) -> None:
    model, rec = _toy_recorder(out, every=10)
    with rec:
        for step in range(25):
            rec.step(step)
            model(torch.randn(2, H))
    assert sorted(p.name for p in out.iterdir()) == [
        "step_000000.parquet",
        "step_000010.parquet",
        "step_000020.parquet",
    ]


def test_gradient_accumulation_forwards_add_up(out: Path) -> None:
    model, rec = _toy_recorder(out, every=1)
    with rec:
        rec.step(0)
        model(torch.randn(3, H))
        model(torch.randn(4, H))
    frame = pl.read_parquet(out / "step_000000.parquet").filter(pl.col("layer") == 0)
    assert frame["token"].to_list() == list(range(7))


def test_max_tokens_caps_and_counts(out: Path) -> None:
    model, rec = _toy_recorder(out, every=1, max_tokens=5)
    with rec:
        rec.step(0)
        model(torch.randn(4, H))
        model(torch.randn(4, H))
    import pyarrow.parquet as pq

    path = out / "step_000000.parquet"
    assert pl.read_parquet(path).group_by("layer").len()["len"].to_list() == [5, 5]
    meta = __import__("json").loads(pq.read_schema(path).metadata[b"routelog"])
    assert meta["layers"]["0"]["tokens_not_recorded"] == 3
    assert meta["payload"] == "logits"
    assert meta["score"] == "softmax"


def test_no_router_found_lists_what_was_searched(out: Path) -> None:
    model = nn.Sequential(nn.Linear(H, H))
    with pytest.raises(
        RecordError, match=r"no router found in Sequential: searched for .*MixtralTopKRouter"
    ):
        Recorder(model, out)
    with pytest.raises(RecordError, match="no module of Sequential matches routers= layers"):
        Recorder(model, out, routers={"layers.*.gate": "logits"})
    assert not out.exists()  # nothing created when no router is found


def test_unknown_router_kind(out: Path) -> None:
    with pytest.raises(RecordError, match="expected one of logits"):
        Recorder(Toy(), out, routers={"layers.*.moe.gate": "logit"})


def test_wrong_expert_count_is_an_error_and_removes_hooks(out: Path) -> None:
    model = Toy()
    model.config = _Config(
        {"num_local_experts": 6, "num_experts_per_tok": 2, "num_hidden_layers": 2}
    )
    rec = Recorder(model, out, routers=ROUTERS, every=1)
    rec.step(0)
    with pytest.raises(RecordError, match="output has 4 experts, but the model config says E = 6"):
        model(torch.randn(2, H))
    assert _hooks(model) == 0
    assert not list(out.glob("*.parquet"))


def test_config_layer_mismatch(out: Path) -> None:
    model = Toy(layers=2)
    model.config = _Config({"num_local_experts": 4, "num_hidden_layers": 3})
    with pytest.raises(RecordError, match=r"no router found for MoE layer\(s\) 2"):
        Recorder(model, out, routers=ROUTERS, top_k=2)
    Recorder(model, out, routers=ROUTERS, top_k=2, check_config=False).close()


def test_a_layer_that_stops_firing_warns_and_is_counted(out: Path) -> None:
    model, rec = _toy_recorder(out, every=1)
    rec.step(0)
    model(torch.randn(2, H))
    model.skip = True
    rec.step(1)
    model(torch.randn(2, H))
    with pytest.warns(RuntimeWarning, match="step 1: the routers of layer.s. 1 did not run"):
        rec.close()
    assert rec.silent_layers == 1


def test_hooks_removed_on_close_and_on_error(out: Path) -> None:
    model, rec = _toy_recorder(out, every=1)
    rec.step(0)
    assert _hooks(model) == 3  # two routers and the input hook
    rec.close()
    assert _hooks(model) == 0
    model, rec = _toy_recorder(out / "b", every=1)

    def train_and_fail() -> None:
        with rec:
            rec.step(0)
            model(torch.randn(2, H))
            raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        train_and_fail()
    assert _hooks(model) == 0
    assert not list((out / "b").glob("*.parquet"))  # the failed step is not written
    model, rec = _toy_recorder(out / "c")
    with pytest.raises(ValueError, match="boom"), rec.capture(5):
        raise ValueError("boom")
    assert _hooks(model) == 0
    with pytest.raises(RecordError, match="closed"):
        rec.step(6)


def test_hooks_are_attached_only_while_a_step_is_recorded(out: Path) -> None:
    model = Toy()
    model.train()
    with Recorder(model, out, routers=ROUTERS, top_k=2, every=10) as rec:
        assert _hooks(model) == 0  # a step that is not recorded runs no recorder code
        for step in range(12):
            rec.step(step)
            assert _hooks(model) == (3 if step % 10 == 0 else 0), step
            model(torch.randn(2, H))
        with rec.capture(15):
            assert _hooks(model) == 3
            model(torch.randn(2, H))
        assert _hooks(model) == 0
        rec.probe(torch.randn(2, H), step=16)
        assert _hooks(model) == 0
    assert sorted(p.name for p in out.glob("*.parquet")) == [
        "step_000000.parquet",
        "step_000010.parquet",
        "step_000015.parquet",
        "step_000016.parquet",
    ]


def test_payload_columns_are_not_dictionary_encoded(out: Path) -> None:
    import pyarrow.parquet as pq

    model, rec = _toy_recorder(out)
    with rec, rec.capture(0):
        model(torch.randn(64, H))
    metadata = pq.ParquetFile(out / "step_000000.parquet").metadata.row_group(0)
    encodings = {
        metadata.column(i).path_in_schema.split(".")[0]: metadata.column(i).encodings
        for i in range(metadata.num_columns)
    }
    dictionary = {name for name, used in encodings.items() if "RLE_DICTIONARY" in used}
    assert dictionary == {"step", "layer", "rank"}  # logits, topk_ids, token: plain


def test_capture_records_whatever_every_says(out: Path) -> None:
    model, rec = _toy_recorder(out, every=1000)
    with rec, rec.capture(7):
        model(torch.randn(2, H))
    assert [p.name for p in out.glob("*.parquet")] == ["step_000007.parquet"]


def test_probe_routes_the_same_tokens_every_step(out: Path) -> None:
    model = Toy()
    model.train()
    probe = torch.randn(6, H)
    with Recorder(model, out, routers=ROUTERS, top_k=1, every=2, probe=probe) as rec:
        for step in range(6):
            rec.step(step)
            model(torch.randn(3, H))  # training forwards are not recorded with a probe
            with torch.no_grad():
                model.layers[0].moe.gate.weight.add_(torch.randn(E, H))
    assert model.training  # restored after each probe
    metrics = routelog.analyze([out]).metrics.sort("step", "layer")
    assert metrics["n_tokens"].to_list() == [6] * 6
    flips = metrics.filter(pl.col("step") > 0)["flip_rate"]
    assert flips.null_count() == 0  # same tokens at every step: flip_rate is known
    assert metrics.filter(pl.col("layer") == 1)["flip_rate"].drop_nulls().to_list() == [0.0, 0.0]


def test_padding_mask_is_recorded(out: Path) -> None:
    class Masked(Toy):
        def forward(self, x: Any, attention_mask: Any = None) -> Any:
            return super().forward(x)

    model = Masked()
    with Recorder(model, out, routers=ROUTERS, top_k=2, every=1) as rec:
        rec.step(0)
        mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
        model(torch.randn(2, 3, H), attention_mask=mask)
    result = routelog.analyze([out])
    assert result.runs[0].summary()["masked_rows"] == 6
    assert result.metrics["n_tokens"].to_list() == [3, 3]


def test_ranks_write_their_own_files_and_analyze_merges_them(
    out: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    probe = torch.randn(5, H)
    for rank in (0, 1):
        monkeypatch.setattr(recorder, "_distributed", lambda torch, r=rank: (r, 2))
        model = Toy()
        with Recorder(model, out, routers=ROUTERS, top_k=1, every=1, probe=probe) as rec:
            rec.step(0)
            rec.step(1)
    names = sorted(p.name for p in out.iterdir())
    assert names == [
        "step_000000.rank0.parquet",
        "step_000000.rank1.parquet",
        "step_000001.rank0.parquet",
        "step_000001.rank1.parquet",
    ]
    assert step_from_name(out / "step_000200.rank3.parquet") == 200
    metrics = routelog.analyze([out]).metrics
    assert metrics["n_tokens"].to_list() == [10] * 4  # both ranks' tokens in one step
    assert metrics.filter(pl.col("step") == 1)["flip_rate"].to_list() == [0.0, 0.0]


def test_full_queue_blocks_or_drops_and_counts(out: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    slow = writer.write_step

    def write_slowly(*args: Any) -> Path:
        time.sleep(0.2)
        return slow(*args)

    monkeypatch.setattr(writer, "write_step", write_slowly)
    for on_full, directory in (("drop", out / "drop"), ("block", out / "block")):
        model, rec = _toy_recorder(directory, every=1, on_full=on_full, queue_size=1)
        with rec:
            for step in range(5):
                rec.step(step)
                model(torch.randn(2, H))
        files = len(list(directory.glob("*.parquet")))
        if on_full == "drop":
            assert rec.dropped > 0
            assert files + rec.dropped == 5
        else:
            assert (rec.dropped, files) == (0, 5)
        assert not [p for p in directory.iterdir() if p.name.startswith(".")]


def test_writer_failure_is_raised_in_the_training_thread(
    out: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fail(*args: Any) -> Path:
        raise OSError("disk full")

    monkeypatch.setattr(writer, "write_step", fail)
    model, rec = _toy_recorder(out, every=1)
    rec.step(0)
    model(torch.randn(2, H))
    with pytest.raises(RecordError, match=r"writing to .* failed: disk full"):
        rec.close()
    assert _hooks(model) == 0


def test_own_adapter(out: Path) -> None:
    """An adapter function for a router returning (probabilities, ids)."""

    class ProbRouter(nn.Module):
        def forward(self, x: Any) -> Any:
            probs = torch.softmax(x[:, :E], dim=-1)
            return probs, torch.tensor([[3]] * len(x))

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList([ProbRouter()])

        def forward(self, x: Any) -> Any:
            return self.layers[0](x)

    adapter = Adapter(lambda module, output: (output[0], output[1]), holds="probs")
    model = Model()
    with Recorder(model, out, routers={"layers.0": adapter}, every=1) as rec:
        rec.step(0)
        model(torch.randn(8, H))
    frame = pl.read_parquet(out / "step_000000.parquet")
    assert "probs" in frame.columns
    row = routelog.analyze([out]).metrics.row(0, named=True)
    assert row["load_share"] == [0.0, 0.0, 0.0, 1.0]


def test_cli_reads_a_recording(out: Path) -> None:
    model, rec = _toy_recorder(out, every=1)
    with rec:
        rec.step(0)
        model(torch.randn(20, H))
    result = runner.invoke(app, ["analyze", str(out)])
    assert result.exit_code == 0, result.output
    assert "k=2" in result.output


def test_without_torch_import_works_and_recorder_says_what_to_install(
    out: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(MissingExtraError, match=r"pip install 'routelog\[torch\]'"):
        routelog.Recorder(object(), out)
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import routelog, routelog.record\n"
        "from routelog.cli import main\n"
        "sys.argv = ['routelog', 'analyze', 'sample_logs/collapse', '--top-k', '2']\n"
        "main()\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr


class _Config:
    def __init__(self, values: dict[str, Any]) -> None:
        self.values = values

    def to_dict(self) -> dict[str, Any]:
        return dict(self.values)


def _hooks(model: Any) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_readme_plain_pytorch_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("transformers")
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Recording from a live model", 1)[1]
    example = section.split("```python\n", 1)[1].split("```", 1)[0]
    model = mixtral()
    ids = torch.randint(0, 64, (2, 6))
    loader = [{"input_ids": ids, "labels": ids}] * 3
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    monkeypatch.chdir(tmp_path)
    exec(example, {"model": model, "loader": loader, "optimizer": optimizer})
    assert [p.name for p in (tmp_path / "runs/exp1").glob("*.parquet")] == ["step_000000.parquet"]
    assert routelog.analyze([tmp_path / "runs/exp1"]).metrics["top_k"].to_list() == [2, 2]
