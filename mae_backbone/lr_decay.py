"""Layer-wise lr decay and weight-decay groups, from the model's own hooks.

The classification fine-tuner, the Detectron2 ``lr_factor_func`` and the MMSeg optimizer
constructor all call these; nothing else parses parameter names for layer ids.
"""
from __future__ import annotations

from typing import Any, Iterable

from torch import nn


def lr_scale(model: nn.Module, name: str, layer_decay: float) -> float:
    """``layer_decay ** (num_layers - 1 - layer_id(name))``: 1.0 for the head, smallest for the stem.

    ``model`` is anything with ``layer_id(name)`` and ``num_layers`` (our ViT).
    """
    return layer_decay ** (model.num_layers - 1 - model.layer_id(name))


def no_decay(name: str, param: nn.Parameter, skip: Iterable[str]) -> bool:
    """Norm weights, biases (all 1-D parameters) and the names in ``skip`` get no weight decay."""
    base = name.split(".")[-1]
    return param.ndim <= 1 or name in skip or base in skip


def layer_decay_param_groups(
    model: nn.Module,
    weight_decay: float,
    layer_decay: float = 1.0,
    backbone: nn.Module | None = None,
    prefix: str = "",
    skip: Iterable[str] | None = None,
) -> list[dict[str, Any]]:
    """Optimizer parameter groups with ``lr_scale`` (layer decay) and per-group weight decay.

    Args:
        model: the module whose trainable parameters are grouped.
        weight_decay: for the decayed groups.
        layer_decay: the per-layer factor (1.0 = none).
        backbone: the ViT that owns the layer-id hook (default ``model``).
        prefix: the backbone's name prefix inside ``model`` (e.g. ``"backbone."``); parameters
            outside it count as the head (scale 1.0).
        skip: extra names without weight decay (default: ``backbone.no_weight_decay()``).
    Returns:
        groups with keys ``params``, ``weight_decay``, ``lr_scale``, ``param_names``.
    """
    vit = backbone if backbone is not None else model
    skip = set(skip if skip is not None else getattr(vit, "no_weight_decay", lambda: set())())
    groups: dict[tuple[float, float], dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        inner = name[len(prefix):] if prefix and name.startswith(prefix) else None
        if prefix and inner is None:
            scale = 1.0
        else:
            scale = lr_scale(vit, inner if inner is not None else name, layer_decay)
        wd = 0.0 if no_decay(inner or name, param, skip) else weight_decay
        group = groups.setdefault((scale, wd), dict(params=[], param_names=[], weight_decay=wd, lr_scale=scale))
        group["params"].append(param)
        group["param_names"].append(name)
    return sorted(groups.values(), key=lambda g: (g["lr_scale"], g["weight_decay"]))
