"""``training.run``: the one run skeleton, driven by a toy trainer (a linear regression)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from mae_backbone.io import safe_torch_load
from training import NonFiniteModelError
from training.loop import MicroBatch, ScheduledStep
from training.options import RunOptions, option
from training.run import CHECKPOINT_NAME, RunParts, Trainer, data_loader, epoch_sampler, run
from training.schedule import cosine_schedule
from training.state import restore_model_and_optimizer, resumable_state, write_state


@dataclass
class ToyOptions(RunOptions):
    output: str = option("run folder", default="")
    epochs: int = option("epochs", default=3)
    batch_size: int = option("batch", default=4)
    accum_iter: int = option("accumulation", default=2)
    seed: int = option("seed", default=0)
    save_every: int = option("checkpoint cadence", default=1)
    resume: str = option("resume from", default=None, type=str)


class Points(Dataset):
    def __init__(self) -> None:
        gen = torch.Generator().manual_seed(0)
        self.x = torch.randn(32, 4, generator=gen)
        self.y = self.x @ torch.tensor([1.0, -2.0, 0.5, 3.0]) + 0.1

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        index, seed = key
        noise = torch.randn(4, generator=torch.Generator().manual_seed(seed % 2**31)) * 0.01  # seeded "augmentation"
        return self.x[index] + noise, self.y[index]


def collate(items: list[Any]) -> dict[str, Any]:
    return {"x": torch.stack([x for x, _ in items]), "y": torch.stack([y for _, y in items]), "failures": []}


@dataclass
class RegressionStep(ScheduledStep):
    def micro_batch(self, model: nn.Module, batch: dict[str, Any], device: torch.device) -> MicroBatch:
        return len(batch["x"]), lambda: ((model(batch["x"]).squeeze(-1) - batch["y"]) ** 2).mean()


class ToyTrainer(Trainer):
    def __init__(self, cfg: ToyOptions, stop_after: int | None = None, poison_after: int | None = None):
        super().__init__(cfg)
        self.stop_after, self.poison_after = stop_after, poison_after
        self.calls: list[str] = []

    def load_state(self, path: Path) -> dict[str, Any]:
        self.calls.append("load_state")
        return safe_torch_load(path)

    def build(self, state: Any) -> RunParts:
        self.calls.append("build")
        cfg, info = self.cfg, self.info
        torch.manual_seed(cfg.seed)
        model = nn.Linear(4, 1)
        dataset = Points()
        sampler = epoch_sampler(len(dataset), "points", cfg, info)
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
        total = cfg.epochs * sampler.steps_per_epoch
        recipe = RegressionStep(accum_iter=cfg.accum_iter, lr_at=cosine_schedule(0.1, 0.0, 2, total), amp_dtype=None,
                                clip_grad=None, max_nonfinite=100, log_every=1, epochs=cfg.epochs)
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        return RunParts(model, optimizer, scaler, sampler, data_loader(dataset, sampler, collate, cfg, info), recipe,
                        {"method": "toy"})

    def restore(self, state: Any, parts: RunParts, source: str) -> int:
        self.calls.append("restore")
        restore_model_and_optimizer(state, parts.model, parts.optimizer, parts.scaler, source)
        return int(state["epoch"])

    def epoch_record(self, epoch: int, stats: Any, counters: Any, parts: RunParts) -> dict[str, Any]:
        return {"type": "epoch", "epoch": epoch, "step": counters.step, "loss": stats.mean_loss}

    def save(self, path: Path, epoch: int, counters: Any, parts: RunParts) -> None:
        self.calls.append(f"save {epoch}")
        state = resumable_state(path, parts.model, parts.optimizer, parts.scaler, epoch, counters.step,
                                counters.as_dict(), self.cfg.to_dict())
        write_state(state, path)

    def after_epoch(self, record: dict[str, Any], parts: RunParts, result: Any) -> None:
        if record["epoch"] == self.poison_after:
            with torch.no_grad():
                parts.model.weight[0, 0] = float("nan")
        if record["epoch"] == self.stop_after:
            raise KeyboardInterrupt("simulated stop after the epoch's checkpoint")

    def finish(self, result: Any, parts: RunParts) -> None:
        self.calls.append("finish")


def toy(tmp_path: Path, name: str, **kw: Any) -> ToyOptions:
    return ToyOptions(output=str(tmp_path / name), num_workers=0, tensorboard=False, progress=False, device="cpu", **kw)


def test_a_stopped_run_resumes_where_it_stopped_and_ends_bit_for_bit_like_the_uninterrupted_one(tmp_path):
    whole = ToyTrainer(toy(tmp_path, "whole"))
    result = run(whole)
    assert (result.epochs_done, result.steps) == (3, 12)  # 32 images / (4 x 2) = 4 steps per epoch
    assert whole.calls == ["build", "save 1", "save 2", "save 3", "finish"]
    assert [r["epoch"] for r in result.history] == [1, 2, 3] and result.history[-1]["loss"] < result.history[0]["loss"]

    stopped = ToyTrainer(toy(tmp_path, "part"), stop_after=1)
    with pytest.raises(KeyboardInterrupt):
        run(stopped)
    resumed = ToyTrainer(toy(tmp_path, "part"))
    again = run(resumed)
    assert resumed.calls == ["load_state", "build", "restore", "save 2", "save 3", "finish"]
    assert again.resumed_from == tmp_path / "part" / CHECKPOINT_NAME and [r["epoch"] for r in again.history] == [2, 3]
    a = safe_torch_load(tmp_path / "whole" / CHECKPOINT_NAME)
    b = safe_torch_load(tmp_path / "part" / CHECKPOINT_NAME)
    assert (a["step"], a["epoch"]) == (b["step"], b["epoch"]) == (12, 3)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])

    runs = [json.loads(line) for line in (tmp_path / "part" / "log.jsonl").read_text().splitlines()]
    starts = [(r["start_epoch"], r["method"], r["steps_per_epoch"]) for r in runs if r["type"] == "run"]
    assert starts == [(0, "toy", 4), (1, "toy", 4)]
    assert json.loads((tmp_path / "part" / "config.json").read_text())["epochs"] == 3


def test_non_finite_weights_are_never_saved_and_the_last_checkpoint_stays(tmp_path):
    with pytest.raises(NonFiniteModelError, match="non-finite in epoch 2"):
        run(ToyTrainer(toy(tmp_path, "nan"), poison_after=1))
    assert safe_torch_load(tmp_path / "nan" / CHECKPOINT_NAME)["epoch"] == 1


def test_too_few_images_for_one_step_is_a_data_error_naming_the_source(tmp_path):
    from training import DataError

    with pytest.raises(DataError, match=r"points: 32 images, fewer than one optimizer step needs \(64 = batch 32"):
        run(ToyTrainer(toy(tmp_path, "few", batch_size=32)))
