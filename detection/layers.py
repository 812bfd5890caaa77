"""Small layers the pyramids need that Detectron2 0.6 does not have.

Detectron2 0.6's ``get_norm`` knows no ``"LN"``; ``LayerNorm2d`` is the channels-first LayerNorm
ViTDet uses after its pyramid convolutions, and ``norm_layer`` maps ``"LN"`` to it before
falling back to Detectron2's own norms, so configs say ``"LN"`` on every Detectron2 version.
"""
from __future__ import annotations

from typing import Callable

import torch
from detectron2.layers import get_norm
from torch import nn

NormSpec = str | Callable[[int], nn.Module]


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of a ``[B, C, H, W]`` map (each pixel normalized on its own).

    Parameter names (``weight``, ``bias``) match Detectron2's ``LayerNorm`` so ViTDet pyramid
    weights load as they are.
    """

    def __init__(self, num_channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, C, H, W] -> [B, C, H, W]."""
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)
        x = (x - mean) * torch.rsqrt(var + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


def norm_layer(norm: NormSpec, channels: int) -> nn.Module | None:
    """A norm module for ``channels``: ``"LN"`` -> ``LayerNorm2d``; else Detectron2's ``get_norm``.

    ``""`` / ``None`` give ``None`` (no norm), as in Detectron2.
    """
    if norm == "LN":
        return LayerNorm2d(channels)
    return get_norm(norm, channels)


def resolve_norm(norm: NormSpec) -> NormSpec:
    """What to hand Detectron2 layers that call ``get_norm`` themselves (FPN, ROI heads).

    ``"LN"`` becomes the ``LayerNorm2d`` class (0.6's ``get_norm`` accepts a callable); other
    values pass through.
    """
    return LayerNorm2d if norm == "LN" else norm
