"""AdamW over layer-decayed parameter groups, ViTDet's (``projects/ViTDet``, ViT-B/L): lr 1e-4,
betas (0.9, 0.999), weight decay 0.1, none for torch norm modules' parameters
(``weight_decay_norm=0``) and ``pos_embed`` (ViTDet's ``overrides``). ViT-H configs set
``weight_decay_norm=None`` and ``no_weight_decay=()``: everything decayed, as ViTDet's ViT-H.

``get_vit_param_groups`` reads each parameter's layer from the ViT's own ``layer_id`` hook; the
detection trainer sets ``optimizer.params.model`` before instantiating, as Detectron2's does.
"""
import torch
from detectron2.config import LazyCall as L

from detection.optim import get_vit_param_groups

AdamW = L(torch.optim.AdamW)(
    params=L(get_vit_param_groups)(
        base_lr="${..lr}",
        weight_decay="${..weight_decay}",
        layer_decay=0.7,
        weight_decay_norm=0.0,
        no_weight_decay=["pos_embed"],
    ),
    lr=1e-4,
    betas=(0.9, 0.999),
    weight_decay=0.1,
)
