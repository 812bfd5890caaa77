"""Layer-wise lr decay for MMSeg segmentors, from the backbone's own ``layer_id`` hook.

``ViTLayerDecayOptimizerConstructor`` asks ``model.backbone`` for ``layer_id(name)`` and
``num_layers`` (our ``MAEViT`` has both) and builds the groups with
``mae_backbone.layer_decay_param_groups``, the same function the classification fine-tuner and
the Detectron2 adapter use.  Nothing here looks at class names or parses block numbers.

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

from mae_backbone import layer_decay_param_groups

_KEYS = ("layer_decay",)


@OPTIM_WRAPPER_CONSTRUCTORS.register_module()
class ViTLayerDecayOptimizerConstructor(DefaultOptimWrapperConstructor):
    """Parameter groups with ``lr = base_lr * layer_decay ** (num_layers - 1 - layer_id)``.

    - backbone parameters: layer id from ``backbone.layer_id(name inside the backbone)``
      (patch embedding / tokens 0, block i -> i + 1);
    - everything else (neck, decode and auxiliary heads): the last id, scale 1.0;
    - weight decay 0 for 1-D parameters (norms, biases) and ``backbone.no_weight_decay()``
      names (``pos_embed``, ``cls_token``, relative-position tables); frozen parameters are left out.

    ``paramwise_cfg`` keys: ``layer_decay`` (float, default 1.0 = no decay).  Any other key is an
    error rather than silently ignored.
    """

    def __init__(self, optim_wrapper_cfg: dict, paramwise_cfg: dict | None = None):
        paramwise_cfg = dict(paramwise_cfg or {})
        unknown = sorted(set(paramwise_cfg) - set(_KEYS))
        if unknown:
            raise KeyError(f"ViTLayerDecayOptimizerConstructor: unknown paramwise_cfg keys {unknown}; "
                           f"supported: {list(_KEYS)}")
        paramwise_cfg.setdefault("layer_decay", 1.0)  # never empty: the base class then calls add_params
        super().__init__(optim_wrapper_cfg, paramwise_cfg)

    def add_params(self, params: list[dict[str, Any]], module: nn.Module, **kwargs: Any) -> None:
        """Fill ``params`` with the layer-decay groups of ``module`` (a segmentor with ``backbone``)."""
        backbone = getattr(module, "backbone", None)
        if backbone is None or not (hasattr(backbone, "layer_id") and hasattr(backbone, "num_layers")):
            raise TypeError(
                "ViTLayerDecayOptimizerConstructor needs a model whose `backbone` has `layer_id(name)` and "
                f"`num_layers` (e.g. MAEViT); got backbone {type(backbone).__name__}")
        layer_decay = float(self.paramwise_cfg["layer_decay"])
        groups = layer_decay_param_groups(module, weight_decay=self.base_wd or 0.0, layer_decay=layer_decay,
                                          backbone=backbone, prefix="backbone.")
        for group in groups:
            group["lr"] = self.base_lr * group["lr_scale"]
        params.extend(groups)
        summary = ", ".join(f"x{g['lr_scale']:.3g}/wd {g['weight_decay']:g}: {len(g['params'])}" for g in groups)
        print_log(f"layer decay {layer_decay} over {backbone.num_layers} layer ids, "
                  f"{len(groups)} groups (lr scale/wd: params): {summary}", logger="current")
