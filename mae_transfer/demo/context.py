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
    seed: int = 0
    recipe: Recipe = field(default_factory=Recipe.demo)
    pretrain_epochs: int = 40
    pretrain_blr: float = 8e-3
    mask_ratio: float = 0.75
    examples: int = 3

    @classmethod
    def make(cls, quick: bool, seed: int = 0) -> "DemoPlan":
        if quick:
            return cls(quick=True, seed=seed, recipe=Recipe.demo(quick=True), pretrain_epochs=3, examples=2)
        return cls(seed=seed)


# key -> (title, function, planned seconds in the full demo on 2 cores: used for the ETA only)
Stages = dict[str, tuple[str, Callable[["DemoContext"], None], float]]


@dataclass
class DemoContext:
    """The demo's shared state: each stage adds its results and figures; the report reads them."""

    out: Path
    plan: DemoPlan
    results: dict[str, dict[str, Any]] = field(default_factory=dict)  # task:metric -> init -> value
    errors: dict[str, str] = field(default_factory=dict)
    figures: dict[str, Path] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    artefacts: dict[str, Path] = field(default_factory=dict)
    stages: Stages = field(default_factory=dict)

    @property
    def data(self) -> Path:
        return self.out / "data"
