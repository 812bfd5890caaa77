"""Layer-wise lr decay, ViTDet's weight-decay rule and its schedule, for Detectron2's optimizer and LR hook.

The layer id of each parameter comes from the ViT's own hook (``VisionTransformer.layer_id``
through ``mae_backbone.lr_scale``); nothing here parses block names. Detectron2 >= 0.7 takes a
name -> factor function (``get_default_optimizer_params(lr_factor_func=...)``); 0.6 does not, so
``get_vit_param_groups`` builds the groups itself, the same way on every version.

Weight decay follows Detectron2's ``get_default_optimizer_params`` as ViTDet configures it: every
parameter is decayed except those of torch's norm modules (``weight_decay_norm``) and the names in
``no_weight_decay`` (ViTDet's ``overrides``). Biases of linear / conv layers, the relative-position
tables and the channels-first ``LayerNorm2d`` of the pyramid and heads (ViTDet's ``"LN"``, which is
not a ``torch.nn.LayerNorm``) are decayed, as in ViTDet.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

from detectron2.solver import WarmupParamScheduler
from fvcore.common.param_scheduler import MultiStepParamScheduler
from torch import nn

from mae_backbone import VisionTransformer, lr_scale

# ViTDet B/L (projects/ViTDet/configs/COCO/mask_rcnn_vitdet_b_100ep.py):
# overrides={"pos_embed": {"weight_decay": 0.0}}; ViT-H: overrides={} (no_weight_decay=())
NO_WEIGHT_DECAY = ("pos_embed",)

# the module types Detectron2's get_default_optimizer_params gives ``weight_decay_norm``
NORM_MODULE_TYPES: tuple[type[nn.Module], ...] = (
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.GroupNorm,
    nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, nn.LayerNorm, nn.LocalResponseNorm,
)


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


def vit_weight_decay(
    model: nn.Module, weight_decay: float, weight_decay_norm: float | None = 0.0,
    no_weight_decay: Sequence[str] = NO_WEIGHT_DECAY,
) -> dict[str, float]:
    """``name -> weight decay`` for every trainable parameter, by ViTDet's rule.

    Args:
        model: the detector.
        weight_decay: the default.
        weight_decay_norm: for parameters of torch norm modules (``NORM_MODULE_TYPES``); ``None``
            decays them like the rest (ViTDet ViT-H). ViTDet B/L: 0.0.
        no_weight_decay: parameter names (the name inside its module, e.g. ``pos_embed``, or the
            full dotted name) with no weight decay (ViTDet's ``overrides``). B/L: ``("pos_embed",)``;
            ViT-H: ``()``.
    """
    skip = set(no_weight_decay)
    out: dict[str, float] = {}
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        for local, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            name = f"{module_name}.{local}" if module_name else local
            wd = weight_decay
            if weight_decay_norm is not None and isinstance(module, NORM_MODULE_TYPES):
                wd = weight_decay_norm
            if local in skip or name in skip:
                wd = 0.0
            out[name] = wd
    return out


def get_vit_param_groups(
    model: nn.Module, base_lr: float, weight_decay: float, layer_decay: float = 1.0,
    weight_decay_norm: float | None = 0.0, no_weight_decay: Sequence[str] = NO_WEIGHT_DECAY,
) -> list[dict[str, Any]]:
    """Optimizer parameter groups with layer-wise lr decay and ViTDet's weight decay, on any Detectron2.

    Use in a LazyConfig as ``optimizer.params = L(get_vit_param_groups)(base_lr="${..lr}", ...)``
    and set ``optimizer.params.model = model`` before ``instantiate(cfg.optimizer)``, exactly like
    Detectron2's ``get_default_optimizer_params``. The defaults are ViTDet's ViT-B/L recipe; its
    ViT-H recipe is ``weight_decay_norm=None, no_weight_decay=()`` (everything decayed).

    Args:
        model: the detector (its ViT is found with ``find_vit``).
        base_lr: the optimizer's lr; each group gets ``base_lr * factor`` (``vit_lr_factor_func``),
            which Detectron2's ``LRMultiplier`` then scales over the schedule.
        weight_decay: the default weight decay.
        layer_decay: the per-layer factor (ViTDet: 0.7 B, 0.8 L, 0.9 H); 1.0 for none.
        weight_decay_norm, no_weight_decay: see ``vit_weight_decay``.
    Returns:
        groups ``{"params", "lr", "weight_decay"}``, one per distinct (lr, weight decay).
    """
    factor = vit_lr_factor_func(model, layer_decay)
    decay = vit_weight_decay(model, weight_decay, weight_decay_norm, no_weight_decay)
    params = dict(model.named_parameters())
    groups: dict[tuple[float, float], dict[str, Any]] = {}
    for name, wd in decay.items():
        lr = base_lr * factor(name)
        groups.setdefault((lr, wd), {"params": [], "lr": lr, "weight_decay": wd})["params"].append(params[name])
    return [groups[k] for k in sorted(groups)]


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
