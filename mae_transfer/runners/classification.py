"""Classification transfer: fine-tuning, linear probing and partial fine-tuning through the
``classification`` package's public API (``make_config`` -> ``train``)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from mae_transfer.runners.recipe import Backbone, DataPaths, Recipe, TaskResult

CLASSIFICATION_TASKS = ("finetune", "linprobe", "partial")


def classification_options(task: str, backbone: Backbone, recipe: Recipe, root: Path, seed: int,
                           out: Path) -> dict[str, Any]:
    """The options ``classification.make_config`` gets for ``task`` (``finetune``, ``linprobe``, ``partial``)."""
    protocol = "linprobe" if task == "linprobe" else "finetune"
    values: dict[str, Any] = {
        "data": str(root), "output": str(out), "model": recipe.arch.name, "model_kwargs": recipe.arch.overrides,
        "seed": seed, "progress": False, "tensorboard": False, "num_workers": 0 if recipe.name == "demo" else 8,
    }
    if recipe.name == "demo":
        values.update(img_size=recipe.img_size, epochs=recipe.cls_epochs, batch_size=recipe.cls_batch,
                      blr=recipe.finetune_blr)
        if protocol == "linprobe":
            values.update(dict(recipe.linprobe_options), epochs=recipe.linprobe_epochs, blr=recipe.linprobe_blr,
                          batch_size=recipe.linprobe_batch)
        else:
            values.update(dict(recipe.cls_options))
        # the result is the last epoch's top-1: evaluate and save once, at the end
        values.update(eval_every=values["epochs"], save_every=values["epochs"])
    if task == "partial":
        values["tune_blocks"] = str(recipe.partial_blocks)
    ld = recipe.layer_decay(task, backbone)
    if ld is not None and protocol == "finetune":
        values["layer_decay"] = ld
    if backbone.checkpoint is not None:
        values["checkpoint"] = str(backbone.checkpoint)
    return values


def run_classification(task: str, backbone: Backbone, recipe: Recipe, data: DataPaths, seed: int,
                       out: Path) -> TaskResult:
    """``finetune``, ``linprobe`` or ``partial`` (fine-tuning of the last ``recipe.partial_blocks``);
    top-1 in % on the val split, the per-epoch training loss."""
    from classification import make_config, train

    if task not in CLASSIFICATION_TASKS:
        raise ValueError(f"not a classification task: {task!r} (known: {', '.join(CLASSIFICATION_TASKS)})")
    root = data.require(task)
    protocol = "linprobe" if task == "linprobe" else "finetune"
    result = train(make_config(protocol, classification_options(task, backbone, recipe, root, seed, out)))
    curve = [(float(h["epoch"]), float(h["train_loss"])) for h in result.history if "train_loss" in h]
    last = next(h for h in reversed(result.history) if "val" in h)
    return TaskResult({"top-1": float(last["val"]["top1"])}, curve, "epoch", note=str(result.freeze))
