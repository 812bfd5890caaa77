"""Layer-wise lr decay and the ViTDet schedule, for Detectron2's optimizer and LR hook.

The layer id of each parameter comes from the ViT's own hook (``VisionTransformer.layer_id``
through ``mae_backbone.lr_scale``); nothing here parses block names. Detectron2 >= 0.7 takes a
name -> factor function (``get_default_optimizer_params(lr_factor_func=...)``); 0.6 does not, so
``get_vit_param_groups`` builds the groups itself, the same way on every version.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

from detectron2.solver import WarmupParamScheduler
from fvcore.common.param_scheduler import MultiStepParamScheduler
from torch import nn

from mae_backbone import VisionTransformer, layer_decay_param_groups, lr_scale

# no weight decay for these (besides every 1-D parameter: norms and biases), as in ViTDet/MAE
NO_WEIGHT_DECAY = ("pos_embed", "cls_token", "rel_pos_h", "rel_pos_w")


def find_vit(model: nn.Module) -> tuple[str, VisionTransformer]:
    """The ViT inside a detector and its name prefix (``"backbone.net."``, ``"backbone.bottom_up.net."``)."""
    for name, module in model.named_modules():
        if isinstance(module, VisionTransformer):
            return (name + "." if name else ""), module
    raise ValueError(f"no mae_backbone VisionTransformer inside this {type(model).__name__}")


def vit_lr_factor_func(model: nn.Module, layer_decay: float) -> Callable[[str], float]:
    """``name -> lr factor`` for every parameter name of ``model`` (Detectron2's ``lr_factor_func``).

    ViT parameters get ``layer_decay ** (num_layers - 1 - layer_id)`` (patch embedding and
    pos-embed smallest, block ``i`` ``layer_decay ** (depth - i)``); everything else (pyramid, RPN,
    ROI heads) gets 1.0. Same numbers as ViTDet's ``get_vit_lr_decay_rate``.
    """
    prefix, vit = find_vit(model)

    def factor(name: str) -> float:
        if prefix and not name.startswith(prefix):
            return 1.0
        return lr_scale(vit, name[len(prefix):], layer_decay)

    return factor


def get_vit_param_groups(
    model: nn.Module, base_lr: float, weight_decay: float, layer_decay: float = 1.0,
    no_weight_decay: Sequence[str] = NO_WEIGHT_DECAY,
) -> list[dict[str, Any]]:
    """Optimizer parameter groups with layer-wise lr decay, for any Detectron2 version.

    Use in a LazyConfig as ``optimizer.params = L(get_vit_param_groups)(base_lr="${..lr}", ...)``
    and set ``optimizer.params.model = model`` before ``instantiate(cfg.optimizer)``, exactly like
    Detectron2's ``get_default_optimizer_params``.

    Args:
        model: the detector (its ViT is found with ``find_vit``).
        base_lr: the optimizer's lr; each group gets ``base_lr * factor``, which Detectron2's
            ``LRMultiplier`` then scales over the schedule.
        weight_decay: for weights; 0 for 1-D parameters (norms, biases) and ``no_weight_decay``.
        layer_decay: the per-layer factor (ViTDet: 0.7 B, 0.8 L, 0.9 H); 1.0 for none.
    Returns:
        groups ``{"params", "lr", "weight_decay"}``, one per distinct (factor, weight decay).
    """
    prefix, vit = find_vit(model)
    groups = layer_decay_param_groups(model, weight_decay, layer_decay, backbone=vit, prefix=prefix,
                                      skip=set(no_weight_decay))
    return [{"params": g["params"], "lr": base_lr * g["lr_scale"], "weight_decay": g["weight_decay"]}
            for g in groups]


def step_lr_multiplier(
    max_iter: int, decay_at: Sequence[float] = (8 / 9, 26 / 27), warmup_iters: int = 250,
    warmup_factor: float = 0.001, gamma: float = 0.1,
) -> WarmupParamScheduler:
    """ViTDet's schedule: linear warmup, then lr x ``gamma`` at fractions ``decay_at`` of training.

    The default fractions are ViTDet's 100-epoch milestones (163889 and 177546 of 184375
    iterations: epochs 88.9 and 96.3), so the schedule follows ``train.max_iter`` when it is
    overridden.
    """
    milestones: list[int] = []
    for f in decay_at:  # a very short run may merge or drop steps: keep them increasing and < max_iter
        m = round(max_iter * f)
        if (not milestones or m > milestones[-1]) and 0 < m < max_iter:
            milestones.append(m)
    values = [gamma**k for k in range(len(milestones) + 1)]
    return WarmupParamScheduler(
        MultiStepParamScheduler(values=values, milestones=milestones, num_updates=max_iter),
        warmup_factor=warmup_factor, warmup_length=min(warmup_iters / max_iter, 1.0),
    )
