"""RoutelogCallback in a real (tiny) HuggingFace Trainer run on the CPU."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import polars as pl
import pytest

pytestmark = pytest.mark.torch
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

import routelog  # noqa: E402
from routelog.integrations.transformers import RoutelogCallback  # noqa: E402
from tests.record.models import mixtral  # noqa: E402


class Tokens(torch.utils.data.Dataset):  # type: ignore[misc]
    def __init__(self) -> None:
        self.ids = torch.randint(0, 64, (16, 8), generator=torch.Generator().manual_seed(3))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _train(out: Path, callback: RoutelogCallback) -> None:
    args = transformers.TrainingArguments(
        output_dir=str(out / "trainer"),
        max_steps=4,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        use_cpu=True,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    transformers.Trainer(
        model=mixtral(), args=args, train_dataset=Tokens(), callbacks=[callback]
    ).train()


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")
def test_trainer_run_is_recorded_every_n_steps(tmp_path: Path) -> None:
    run = tmp_path / "routing"
    _train(tmp_path, RoutelogCallback(run, every=2))
    assert sorted(p.name for p in run.glob("*.parquet")) == [
        "step_000000.parquet",
        "step_000002.parquet",
    ]
    assert (run / "config.json").is_file()  # k and E for every reader
    result = routelog.analyze([run])
    metrics = result.metrics
    assert metrics["top_k"].unique().to_list() == [2]
    assert metrics["n_experts"].unique().to_list() == [4]
    assert metrics["n_tokens"].to_list() == [16] * 4  # two sequences of 8 tokens per layer
    assert not result.runs[0].top_k_assumed


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")
def test_trainer_run_with_a_probe_batch(tmp_path: Path) -> None:
    run = tmp_path / "probe"
    probe = {"input_ids": torch.arange(12).reshape(2, 6)}
    _train(tmp_path, RoutelogCallback(run, every=1, probe=probe))
    metrics = routelog.analyze([run]).metrics.sort("step", "layer")
    assert metrics["step"].unique().to_list() == [0, 1, 2, 3]
    assert metrics["n_tokens"].unique().to_list() == [12]
    # the same probe tokens at every step: flip_rate is known after the first step
    assert metrics.filter(pl.col("step") > 0)["flip_rate"].null_count() == 0
