"""Published numbers to show beside a benchmark's own, by task, metric, pretraining method and model size.

Each number names its source (transcribed from the project's ``REFERENCE.md``, which cites the MAE
paper, He et al. arXiv 2111.06377; ViTDet, Li et al. arXiv 2203.16527). They belong to the
published recipes at full scale (ImageNet-1K 224 px, COCO with ViTDet's 100-epoch schedule, ADE20K
512 px 160k iterations); a run at another size or on other data has no comparable number
(``lookup`` returns None, shown as "n/a").
"""
from __future__ import annotations

from dataclasses import dataclass

METHODS = ("mae", "mocov3", "supervised", "scratch")
SIZES = ("B", "L", "H")

MAE_T9 = "MAE paper, ImageNet-1K fine-tuning at 224 px (scratch / MoCo v3 / MAE rows)"
MAE_LIN = "MAE paper, ImageNet-1K linear probing"
MAE_PARTIAL = "MAE paper, partial fine-tuning of ViT-L (last block tuned)"
DEIT = "DeiT-B, supervised ImageNet-1K (as cited by the MAE paper)"
VITDET = "ViTDet paper, Mask R-CNN with the simple pyramid, COCO (random init / IN-1K supervised / MAE)"
MAE_T5 = "MAE paper Table 5, UperNet on ADE20K at 512 px, 160k iterations"


@dataclass(frozen=True)
class Reference:
    value: float
    source: str


# (task, metric, method, size) -> Reference
REFERENCE: dict[tuple[str, str, str, str], Reference] = {}


def _add(task: str, metric: str, method: str, source: str, **by_size: float) -> None:
    for size, value in by_size.items():
        REFERENCE[(task, metric, method, size)] = Reference(value, source)


_add("finetune", "top-1", "scratch", MAE_T9, B=82.3, L=82.6, H=83.1)
_add("finetune", "top-1", "mocov3", MAE_T9, B=83.2, L=84.1)
_add("finetune", "top-1", "mae", MAE_T9, B=83.6, L=85.9, H=86.9)
_add("finetune", "top-1", "supervised", DEIT, B=81.8)
_add("linprobe", "top-1", "mae", MAE_LIN, B=68.0, L=75.8, H=76.6)
_add("partial", "top-1", "mae", MAE_PARTIAL, L=81.0)
_add("detect", "AP box", "mae", VITDET, B=51.6, L=55.6, H=56.7)
_add("detect", "AP mask", "mae", VITDET, B=45.9, L=49.2, H=50.1)
_add("detect", "AP box", "scratch", VITDET, B=48.1)
_add("detect", "AP box", "supervised", VITDET, B=47.6)
_add("segment", "mIoU", "supervised", MAE_T5, B=47.4, L=49.9)
_add("segment", "mIoU", "mocov3", MAE_T5, B=47.3, L=49.1)
_add("segment", "mIoU", "mae", MAE_T5, B=48.1, L=53.6)


def lookup(task: str, metric: str, method: str | None, size: str | None) -> Reference | None:
    """The published number for this cell, or None (unknown method, unpublished size, tiny model)."""
    if method is None or size is None:
        return None
    return REFERENCE.get((task, metric, method, size))
