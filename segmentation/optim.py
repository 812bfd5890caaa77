"""Layer-wise lr decay for MMSeg segmentors, from the backbone's own ``layer_id`` hook.

``ViTLayerDecayOptimizerConstructor`` asks ``model.backbone`` for ``layer_id(name)`` and
``num_layers`` (our ``MAEViT`` has both); nothing here looks at class names or parses block
numbers.  Its decisions equal MMSeg's ``LayerDecayOptimizerConstructor`` on MMSeg's ``MAE``
backbone (the MAE paper's ADE20K recipe, ``mae-base_upernet_8xb2-amp-160k``), parameter by
parameter (``tests/segmentation/test_oracle_mmseg_optim.py``):

- lr ``base_lr * layer_decay ** (num_layers - 1 - layer_id)`` with ``num_layers = depth + 2``:
  patch embedding, class token and position embedding id 0, block i id i + 1, everything else
  (the neck, the decode and auxiliary heads) the last id, scale 1.0;
- no weight decay for 1-D parameters (norms, biases, layer scales) and names ending in ``.bias``.
  MMSeg (and BEiT's segmentation code, which it copies) also lists ``pos_embed`` and ``cls_token``,
  but compares them with the full name (``backbone.pos_embed``), so they never match: the position
  embedding, the class token and the relative position tables ARE decayed in the published runs.
  That is the default (``weight_decay_rule='mmseg'``); ``'hooks'`` exempts them as timm and the
  official MAE fine-tuning code do (``backbone.no_weight_decay()``).
- frozen parameters are left out.

Config::

    optim_wrapper = dict(
        type='OptimWrapper',
        optimizer=dict(type='AdamW', lr=1e-4, betas=(0.9, 0.999), weight_decay=0.05),
        constructor='ViTLayerDecayOptimizerConstructor',
        paramwise_cfg=dict(layer_decay=0.65))
"""
from __future__ import annotations

from typing import Any

from mmengine.logging import print_log
from mmengine.optim import DefaultOptimWrapperConstructor
from mmseg.registry import OPTIM_WRAPPER_CONSTRUCTORS
from torch import nn

from mae_backbone import lr_scale

_KEYS = ("layer_decay", "weight_decay_rule")
WEIGHT_DECAY_RULES = ("mmseg", "hooks")


def mmseg_no_decay(name: str, param: nn.Parameter) -> bool:
    """MMSeg's ``LearningRateDecayOptimizerConstructor`` rule, as it acts on a segmentor's names."""
    return len(param.shape) == 1 or name.endswith(".bias")


@OPTIM_WRAPPER_CONSTRUCTORS.register_module()
class ViTLayerDecayOptimizerConstructor(DefaultOptimWrapperConstructor):
    """Parameter groups with ``lr = base_lr * layer_decay ** (num_layers - 1 - layer_id)``.

    ``paramwise_cfg`` keys: ``layer_decay`` (float, default 1.0 = no decay) and
    ``weight_decay_rule`` (``'mmseg'``, default, or ``'hooks'``; see the module docstring).  Any
    other key is an error rather than silently ignored.
    """

    PARAMWISE_KEYS = tuple(_KEYS)  # checked by segmentation.engine.load_config, with a suggestion

    def __init__(self, optim_wrapper_cfg: dict, paramwise_cfg: dict | None = None):
        paramwise_cfg = dict(paramwise_cfg or {})
        unknown = sorted(set(paramwise_cfg) - set(_KEYS))
        if unknown:
            raise KeyError(f"ViTLayerDecayOptimizerConstructor: unknown paramwise_cfg keys {unknown}; "
                           f"supported: {list(_KEYS)}")
        paramwise_cfg.setdefault("layer_decay", 1.0)  # never empty: the base class then calls add_params
        paramwise_cfg.setdefault("weight_decay_rule", "mmseg")
        if paramwise_cfg["weight_decay_rule"] not in WEIGHT_DECAY_RULES:
            raise ValueError(f"ViTLayerDecayOptimizerConstructor: weight_decay_rule must be one of "
                             f"{WEIGHT_DECAY_RULES}, got {paramwise_cfg['weight_decay_rule']!r}")
        super().__init__(optim_wrapper_cfg, paramwise_cfg)

    def add_params(self, params: list[dict[str, Any]], module: nn.Module, **kwargs: Any) -> None:
        """Fill ``params`` with the layer-decay groups of ``module`` (a segmentor with ``backbone``)."""
        backbone = getattr(module, "backbone", None)
        if backbone is None or not (hasattr(backbone, "layer_id") and hasattr(backbone, "num_layers")):
            raise TypeError(
                "ViTLayerDecayOptimizerConstructor needs a model whose `backbone` has `layer_id(name)` and "
                f"`num_layers` (e.g. MAEViT); got backbone {type(backbone).__name__}")
        layer_decay = float(self.paramwise_cfg["layer_decay"])
        rule = self.paramwise_cfg["weight_decay_rule"]
        skip = set(backbone.no_weight_decay()) if rule == "hooks" else set()
        base_wd = self.base_wd or 0.0
        groups: dict[tuple[float, float], dict[str, Any]] = {}
        for name, param in module.named_parameters():
            if not param.requires_grad:
                continue
            inner = name[len("backbone."):] if name.startswith("backbone.") else None
            scale = lr_scale(backbone, inner, layer_decay) if inner is not None else 1.0
            if rule == "mmseg":
                no_wd = mmseg_no_decay(name, param)
            else:
                no_wd = param.ndim <= 1 or name.rsplit(".", 1)[-1] in skip
            wd = 0.0 if no_wd else base_wd
            group = groups.setdefault((scale, wd), dict(params=[], param_names=[], weight_decay=wd, lr_scale=scale,
                                                        lr=self.base_lr * scale))
            group["params"].append(param)
            group["param_names"].append(name)
        ordered = sorted(groups.values(), key=lambda g: (g["lr_scale"], g["weight_decay"]))
        params.extend(ordered)
        summary = ", ".join(f"x{g['lr_scale']:.3g}/wd {g['weight_decay']:g}: {len(g['params'])}" for g in ordered)
        print_log(f"layer decay {layer_decay} over {backbone.num_layers} layer ids, weight decay rule {rule!r}, "
                  f"{len(ordered)} groups (lr scale/wd: params): {summary}", logger="current")
