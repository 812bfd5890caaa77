"""Published numbers to show beside a benchmark's own, by task, metric, pretraining method and model size.

Each number names its source (transcribed from the project's ``REFERENCE.md``, which cites the MAE
paper, He et al. arXiv 2111.06377; ViTDet, Li et al. arXiv 2203.16527) and the *recipe* that
produced it. A number is shown only beside a run of the same recipe: the bench runs every backbone,
random init included, through the published transfer recipes (``TASK_RECIPES``), so the
from-scratch rows (MAE Table 11's 300-epoch recipe with wd 0.3 and EMA; ViTDet's longer
random-init schedule) are kept here for the record but never shown beside them. The numbers belong
to full scale (ImageNet-1K 224 px, COCO with ViTDet's schedule, ADE20K 512 px 160k iterations); a
run at another size or on other data has no comparable number (``lookup`` returns None, shown as
"n/a").
"""
from __future__ import annotations

from dataclasses import dataclass

METHODS = ("mae", "mocov3", "supervised", "scratch")
SIZES = ("B", "L", "H")

MAE_T9 = "MAE paper, ImageNet-1K fine-tuning at 224 px (scratch / MoCo v3 / MAE rows)"
MAE_LIN = "MAE paper, ImageNet-1K linear probing"
MAE_PARTIAL = "MAE paper, partial fine-tuning of ViT-L (last block tuned)"
DEIT = "DeiT-B, supervised ImageNet-1K (as cited by the MAE paper)"
VITDET = "ViTDet paper, Mask R-CNN with the simple pyramid, COCO (MAE)"
VITDET_T4 = "ViTDet paper, pre-training ablation (random init / IN-1K supervised; its MAE row is 51.2)"
MAE_T5 = "MAE paper Table 5, UperNet on ADE20K at 512 px, 160k iterations"

# recipe key -> what it is; a Reference names the recipe its number was trained with
RECIPES: dict[str, str] = {
    "mae-finetune": "MAE end-to-end fine-tuning (FINETUNE.md: B 100 ep / L, H 50 ep, layer decay, wd 0.05)",
    "mae-linprobe": "MAE linear probing (BatchNorm + linear head, LARS, 90 epochs)",
    "mae-partial": "MAE partial fine-tuning (the last block + head, fine-tuning recipe)",
    "vitdet": "ViTDet Mask R-CNN, simple pyramid, window + global blocks, rel-pos, LSJ 1024, 100 ep (H: 75)",
    "mae-upernet": "MAE paper A.4: UperNet with BEiT's segmentation recipe, 512 px, 160k iterations",
    "mae-scratch": "MAE Table 11: ViT from scratch, 300 ep (B) / 200 (L, H), wd 0.3, EMA, no layer decay",
    "mocov3-finetune": "MoCo v3 paper's own fine-tuning (DeiT-style), as cited by the MAE paper",
    "deit": "DeiT supervised training from scratch (300 epochs)",
    "vitdet-ablation": "ViTDet pre-training ablation: another setting than the main results (MAE B 51.2 there, "
                       "51.6 in the main recipe); random init with a longer schedule",
}
# the recipe each bench task runs with ``Recipe.paper`` (mae_transfer.runners): the default of ``lookup``
TASK_RECIPES: dict[str, str] = {
    "finetune": "mae-finetune",
    "linprobe": "mae-linprobe",
    "partial": "mae-partial",
    "detect": "vitdet",
    "segment": "mae-upernet",
}


@dataclass(frozen=True)
class Reference:
    """A published number, its source, and the recipe (a ``RECIPES`` key) that produced it."""

    value: float
    source: str
    recipe: str


# (task, metric, method, size) -> Reference
REFERENCE: dict[tuple[str, str, str, str], Reference] = {}


def _add(task: str, metric: str, method: str, source: str, recipe: str, **by_size: float) -> None:
    if recipe not in RECIPES:
        raise KeyError(f"unknown recipe {recipe!r}")
    for size, value in by_size.items():
        REFERENCE[(task, metric, method, size)] = Reference(value, source, recipe)


_add("finetune", "top-1", "scratch", MAE_T9, "mae-scratch", B=82.3, L=82.6, H=83.1)
_add("finetune", "top-1", "mocov3", MAE_T9, "mocov3-finetune", B=83.2, L=84.1)
_add("finetune", "top-1", "mae", MAE_T9, "mae-finetune", B=83.6, L=85.9, H=86.9)
_add("finetune", "top-1", "supervised", DEIT, "deit", B=81.8)
_add("linprobe", "top-1", "mae", MAE_LIN, "mae-linprobe", B=68.0, L=75.8, H=76.6)
_add("partial", "top-1", "mae", MAE_PARTIAL, "mae-partial", L=81.0)
_add("detect", "AP box", "mae", VITDET, "vitdet", B=51.6, L=55.6, H=56.7)
_add("detect", "AP mask", "mae", VITDET, "vitdet", B=45.9, L=49.2, H=50.1)
_add("detect", "AP box", "scratch", VITDET_T4, "vitdet-ablation", B=48.1)
_add("detect", "AP box", "supervised", VITDET_T4, "vitdet-ablation", B=47.6)
_add("segment", "mIoU", "supervised", MAE_T5, "mae-upernet", B=47.4, L=49.9)
_add("segment", "mIoU", "mocov3", MAE_T5, "mae-upernet", B=47.3, L=49.1)
_add("segment", "mIoU", "mae", MAE_T5, "mae-upernet", B=48.1, L=53.6)


def lookup(task: str, metric: str, method: str | None, size: str | None, recipe: str | None = None) -> Reference | None:
    """The published number for this cell, or None (unknown method, unpublished size, tiny model,
    or a number from another recipe than the run's).

    Args:
        recipe: the recipe the run used (a ``RECIPES`` key); default: the task's published transfer
            recipe, ``TASK_RECIPES[task]``, which is what the bench runs.
    """
    if method is None or size is None:
        return None
    ref = REFERENCE.get((task, metric, method, size))
    wanted = recipe if recipe is not None else TASK_RECIPES.get(task)
    return ref if ref is not None and ref.recipe == wanted else None
