"""What the demo compares and what its stages share: the plan (sizes) and the context (results,
errors, figures, timings) that every stage writes into and the report reads."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from mae_transfer.runners import Recipe

INITS = ("mae", "random")
INIT_LABELS = {"mae": "MAE", "random": "random init"}


@dataclass(frozen=True)
class DemoPlan:
    """Sizes of the demo; ``quick`` is the ~3-minute smoke run, the default fits 15 minutes on 2 cores."""

    quick: bool = False
    seed: int = 0  # of the data, the pretraining, segmentation and detection
    cls_seeds: tuple[int, ...] = (0, 1, 2)  # of each classification protocol: mean ± std over these
    recipe: Recipe = field(default_factory=Recipe.demo)
    # MAE on the unlabeled images (plus the labeled ones' pixels): ~600 steps of 64 images
    pretrain_epochs: int = 18
    pretrain_batch: int = 64
    pretrain_blr: float = 6e-3  # lr 1.5e-3 at batch 64
    pretrain_limit: int | None = None  # pretrain on the first N images only (the quick run)
    # the images are whole objects: no random resized crop that would cut outlines away (MAE works
    # without augmentation too, paper Table 1e)
    pretrain_aug: str = "none"
    mask_ratio: float = 0.75
    examples: int = 3

    @classmethod
    def make(cls, quick: bool, seed: int = 0) -> "DemoPlan":
        seeds = tuple(range(seed, seed + 3))
        if quick:
            return cls(quick=True, seed=seed, cls_seeds=seeds, recipe=Recipe.demo(quick=True), pretrain_epochs=2,
                       pretrain_limit=256, examples=2)
        return cls(seed=seed, cls_seeds=seeds)


# key -> (title, function, planned seconds in the full demo on 2 cores: used for the ETA only)
Stages = dict[str, tuple[str, Callable[["DemoContext"], None], float]]


@dataclass
class DemoContext:
    """The demo's shared state: each stage adds its results and figures; the report reads them."""

    out: Path
    plan: DemoPlan
    # task:metric -> init -> [value per seed]; "data" / "pretrain" -> {fact: value}
    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    notes: dict[str, dict[str, str]] = field(default_factory=dict)  # task:metric -> init -> why it is 0 / n.a.
    errors: dict[str, str] = field(default_factory=dict)
    figures: dict[str, Path] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    artefacts: dict[str, Path] = field(default_factory=dict)
    stages: Stages = field(default_factory=dict)

    @property
    def data(self) -> Path:
        return self.out / "data"
