"""The demo's stages: sample data -> MAE pretraining -> each transfer task, MAE vs random init.

A stage is ``stage(ctx) -> None``: it runs, then records its numbers in ``ctx.results`` and its
figures in ``ctx.figures``. The transfer stages call the task runners through
``mae_transfer.runners`` (``runners.run_task``), the same entry point ``mae-transfer bench`` uses.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mae_transfer import runners
from mae_transfer.demo.context import INIT_LABELS, INITS, DemoContext, Stages
from mae_transfer.demo.figures import plot_curves, plot_detections, plot_segmentations
from mae_transfer.runners import CLASSIFICATION_TASKS, TASK_METRICS, Backbone, DataPaths, TaskResult


def stage_data(ctx: DemoContext) -> None:
    from mae_transfer.sample_data import write_sample_data

    summary = write_sample_data(ctx.data, seed=ctx.plan.seed)
    ctx.results["data"] = {k: v for k, v in summary.items() if isinstance(v, int) and k != "seed"}


def pretrain_images(data: Path) -> list[Path]:
    """The demo's pretraining set, no labels used: the unlabeled images, the labeled training images
    of the classifiers and the training scenes (never a val image)."""
    return (sorted((data / "unlabeled").glob("*.png")) + sorted((data / "classification" / "train").rglob("*.png"))
            + sorted((data / "coco" / "train2017").glob("*.jpg")))


def stage_pretrain(ctx: DemoContext) -> None:
    from pretrain import make_config, train

    plan = ctx.plan
    images = pretrain_images(ctx.data)[:plan.pretrain_limit]
    if not images:
        raise FileNotFoundError(f"{ctx.data}: no sample images to pretrain on (run the data stage)")
    listing = ctx.out / "pretrain_images.txt"
    listing.write_text("".join(f"{p}\n" for p in images))
    arch = plan.recipe.arch
    cfg = make_config({
        "data": str(listing), "output": str(ctx.out / "pretrain"),
        "model": "mae_" + arch.name, "img_size": plan.recipe.img_size, "model_kwargs": arch.overrides,
        "decoder_depth": 2, "decoder_dim": 128, "decoder_heads": 4, "mask_ratio": plan.mask_ratio,
        "aug": plan.pretrain_aug,
        "epochs": plan.pretrain_epochs, "warmup_epochs": max(1, plan.pretrain_epochs // 10),
        "batch_size": plan.pretrain_batch, "blr": plan.pretrain_blr, "num_workers": 0, "seed": plan.seed,
        "progress": False,
        "vis_every": plan.pretrain_epochs, "vis_images": 6, "save_every": plan.pretrain_epochs,
        "tensorboard": False,
    })
    result = train(cfg)
    # the run's whole log: a run resumed (or already finished) in this folder has only part of it in
    # ``result.history``
    by_epoch = {int(h["epoch"]): float(h["loss"]) for h in _log_records(ctx.out / "pretrain" / "log.jsonl")
                if h.get("type") == "epoch" and "loss" in h and "epoch" in h}
    losses = [by_epoch[e] for e in sorted(by_epoch)]
    if not losses:
        raise RuntimeError(f"{ctx.out / 'pretrain' / 'log.jsonl'}: no epoch was logged")
    ctx.artefacts["encoder"] = result.encoder
    ctx.results["pretrain"] = {"images": len(images), "epochs": result.epochs_done,
                               "first loss": round(losses[0], 4), "last loss": round(losses[-1], 4)}
    ctx.figures["MAE pretraining loss"] = plot_curves(
        {"MAE": [(i + 1.0, v) for i, v in enumerate(losses)]}, "MAE pretraining loss (masked patches, norm-pixel MSE)",
        "epoch", ctx.out / "figures" / "pretrain_loss.png")
    grids = sorted((ctx.out / "pretrain" / "vis").glob("*.png"))
    if grids:
        ctx.figures["reconstructions (original | masked | reconstruction | reconstruction + visible)"] = grids[-1]


def _log_records(path: Path) -> list[dict[str, Any]]:
    """The JSON lines of a run log; a line cut by a kill is skipped."""
    records = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def _encoder(ctx: DemoContext) -> Path:
    """The encoder of this run's pretrain stage, or of an earlier run in the same folder (--only)."""
    from pretrain import ENCODER_NAME

    enc = ctx.artefacts.get("encoder") or ctx.out / "pretrain" / ENCODER_NAME
    if not Path(enc).is_file():
        raise RuntimeError(f"no pretrained encoder at {enc} (the pretrain stage did not finish)")
    return Path(enc)


def _transfer(ctx: DemoContext, task: str) -> dict[str, TaskResult]:
    """``task`` from the MAE encoder and from random init, same recipe and seeds (the classification
    protocols over ``plan.cls_seeds``, the others on ``plan.seed``); returns the first seed's runs."""
    plan = ctx.plan
    seeds = plan.cls_seeds if task in CLASSIFICATION_TASKS else (plan.seed,)
    backbones = {"mae": Backbone("MAE", _encoder(ctx), method="mae"),
                 "random": Backbone("random init", method="scratch")}
    runs: dict[str, list[TaskResult]] = {}
    for init, backbone in backbones.items():
        for seed in seeds:
            out = ctx.out / task / init / f"seed{seed}"
            runs.setdefault(init, []).append(runners.run_task(
                task, backbone, plan.recipe, DataPaths.sample(ctx.data), seed, out,
                examples=plan.examples if seed == seeds[0] else 0))
    for metric in TASK_METRICS[task]:
        key = f"{task}:{metric}"
        ctx.results[key] = {init: [r.metrics[metric] for r in found] for init, found in runs.items()}
        notes = {init: "; ".join(dict.fromkeys(r.notes[metric] for r in found if metric in r.notes))
                 for init, found in runs.items()}
        if any(notes.values()):
            ctx.notes[key] = {init: note for init, note in notes.items() if note}
    first = {init: found[0] for init, found in runs.items()}
    ctx.figures[f"{task}: training loss"] = plot_curves(
        {INIT_LABELS[i]: r.curve for i, r in first.items()},
        f"{task}: training loss, MAE vs random init (seed {seeds[0]})", first["mae"].curve_unit,
        ctx.out / "figures" / f"{task}_loss.png")
    return first


def _examples(found: dict[str, TaskResult]) -> dict[str, list[tuple[Path, Any]]]:
    """Each init's example predictions, under its label, MAE first."""
    return {INIT_LABELS[i]: found[i].examples for i in INITS}


def stage_finetune(ctx: DemoContext) -> None:
    _transfer(ctx, "finetune")


def stage_linprobe(ctx: DemoContext) -> None:
    _transfer(ctx, "linprobe")


def stage_partial(ctx: DemoContext) -> None:
    _transfer(ctx, "partial")


def stage_segment(ctx: DemoContext) -> None:
    found = _transfer(ctx, "segment")
    ctx.figures["example segmentations (image | ground truth | MAE | random init)"] = plot_segmentations(
        _examples(found), ctx.out / "figures" / "segment_examples.png")


def stage_detect(ctx: DemoContext) -> None:
    found = _transfer(ctx, "detect")
    ctx.figures["example detections, the 4 highest scores per image (MAE | random init)"] = plot_detections(
        _examples(found), ctx.out / "figures" / "detect_examples.png")


STAGES: Stages = {
    # key: (title, function, planned seconds in the full demo on 2 cores -- used for the ETA only)
    "data": ("sample data", stage_data, 5),
    "pretrain": ("MAE pretraining", stage_pretrain, 150),
    "finetune": ("fine-tuning, MAE vs random init", stage_finetune, 70),
    "linprobe": ("linear probing, MAE vs random init", stage_linprobe, 40),
    "partial": ("partial fine-tuning, MAE vs random init", stage_partial, 50),
    "segment": ("UperNet segmentation, MAE vs random init", stage_segment, 150),
    "detect": ("Mask R-CNN (ViTDet pyramid), MAE vs random init", stage_detect, 180),
}
