"""Transfer runners: one backbone through one transfer recipe on one seed -> ``TaskResult``.

``run_task`` is the one entry point of ``mae-transfer demo`` (MAE vs random init) and
``mae-transfer bench`` (named backbones over seeds); both call it through this module
(``runners.run_task``), so every recipe has one implementation:

- ``classification``: fine-tuning, linear probing, partial fine-tuning (``classification``);
- ``segmentation``: UperNet through MMSeg, config edited from the shipped recipe and saved;
- ``detection``: Mask R-CNN (ViTDet pyramid) through Detectron2, config edited and saved.
"""
from __future__ import annotations

from pathlib import Path

from mae_transfer.runners.classification import CLASSIFICATION_TASKS, run_classification
from mae_transfer.runners.detection import run_detection
from mae_transfer.runners.recipe import (
    TASK_METRICS,
    TASKS,
    Arch,
    Backbone,
    DataPaths,
    Recipe,
    TaskResult,
    checkpoint_arch,
)
from mae_transfer.runners.segmentation import run_segmentation


def run_task(task: str, backbone: Backbone, recipe: Recipe, data: DataPaths, seed: int, out: Path,
             examples: int = 0) -> TaskResult:
    """One backbone through one transfer recipe on one seed; writes its run under ``out``.

    Args:
        task: one of ``TASKS``.
        examples: how many val images' predictions to return (segmentation, detection).
    Raises:
        ValueError: an unknown task, or data the task needs is missing.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r} (known: {', '.join(TASKS)})")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if task == "segment":
        return run_segmentation(backbone, recipe, data, seed, out, examples)
    if task == "detect":
        return run_detection(backbone, recipe, data, seed, out, examples)
    assert task in CLASSIFICATION_TASKS
    return run_classification(task, backbone, recipe, data, seed, out)


__all__ = [
    "CLASSIFICATION_TASKS", "TASKS", "TASK_METRICS", "Arch", "Backbone", "DataPaths", "Recipe", "TaskResult",
    "checkpoint_arch", "run_classification", "run_detection", "run_segmentation", "run_task",
]
