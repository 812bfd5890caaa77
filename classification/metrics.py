"""Top-k accuracy, counted exactly over a whole validation set (and over processes)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch


def topk_correct(logits: torch.Tensor, targets: torch.Tensor, ks: Sequence[int] = (1, 5)) -> list[int]:
    """How many samples have their target among the ``k`` highest logits, for each ``k``.

    Args:
        logits: [B, C].
        targets: [B] class indices.
        ks: the k's; each is clipped to C (top-5 of a 3-class problem is top-3, i.e. always right).
    Returns:
        one count per k.
    """
    if logits.ndim != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(f"expected logits [B, C] and targets [B], got {tuple(logits.shape)} and {tuple(targets.shape)}")
    kmax = min(max(ks), logits.shape[1])
    top = logits.topk(kmax, dim=1).indices  # [B, kmax], best first
    hit = top.eq(targets[:, None])  # [B, kmax]
    return [int(hit[:, : min(k, kmax)].any(dim=1).sum()) for k in ks]


@dataclass
class AccuracyMeter:
    """Sums of top-1 / top-5 hits and loss over batches; ``result()`` gives percentages."""

    num_classes: int
    images: int = 0
    top1: int = 0
    top5: int = 0
    loss_sum: float = 0.0
    per_class: list[list[int]] = field(default_factory=list)  # [hits, count] per class

    def __post_init__(self) -> None:
        if not self.per_class:
            self.per_class = [[0, 0] for _ in range(self.num_classes)]

    def update(self, logits: torch.Tensor, targets: torch.Tensor, loss: float | None = None) -> None:
        """Add a batch: logits [B, C], targets [B], ``loss`` its mean loss."""
        c1, c5 = topk_correct(logits, targets, (1, 5))
        n = int(targets.numel())
        self.images += n
        self.top1 += c1
        self.top5 += c5
        if loss is not None:
            self.loss_sum += float(loss) * n
        pred = logits.argmax(dim=1)
        for t, p in zip(targets.tolist(), pred.tolist()):
            self.per_class[t][1] += 1
            self.per_class[t][0] += int(t == p)

    def as_list(self) -> list[float]:
        """The sums as one flat list (for an all-reduce); ``from_list`` inverts it."""
        flat = [float(v) for hc in self.per_class for v in hc]
        return [float(self.images), float(self.top1), float(self.top5), self.loss_sum, *flat]

    @classmethod
    def from_list(cls, values: Sequence[float]) -> "AccuracyMeter":
        v = list(values)
        per = [[int(v[i]), int(v[i + 1])] for i in range(4, len(v), 2)]
        return cls(len(per), int(v[0]), int(v[1]), int(v[2]), float(v[3]), per)

    def result(self) -> dict[str, float]:
        """``top1``, ``top5`` (percent), ``loss`` (mean), ``images``, ``mean_class_acc`` (percent)."""
        n = max(self.images, 1)
        seen = [h / c for h, c in self.per_class if c]
        return {
            "top1": 100.0 * self.top1 / n,
            "top5": 100.0 * self.top5 / n,
            "loss": self.loss_sum / n,
            "images": self.images,
            "mean_class_acc": 100.0 * sum(seen) / len(seen) if seen else 0.0,
        }
