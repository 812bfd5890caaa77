"""mae_backbone: the one ViT of the toolkit, its checkpoints and converters (torch + timm only)."""
from mae_backbone.checkpoint import (
    HEAD_KEYS,
    LAYER_SCALE_KEYS,
    REL_POS_KEYS,
    LoadReport,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
    write_checkpoint,
)
from mae_backbone.io import (
    CheckpointError,
    UnsafeCheckpointError,
    atomic_torch_save,
    atomic_write,
    safe_torch_load,
)
from mae_backbone.layers import Attention, Block, LayerScale, Mlp
from mae_backbone.lr_decay import layer_decay_param_groups, lr_scale
from mae_backbone.pos_embed import (
    resample_abs_pos_embed,
    resample_beit_rel_pos,
    resample_patch_embed,
    resample_rel_pos,
    sincos_2d_pos_embed,
)
from mae_backbone.vit import VIT_ARCHS, FeatureSpec, VisionTransformer, create_vit, list_models

__all__ = [
    "HEAD_KEYS",
    "LAYER_SCALE_KEYS",
    "REL_POS_KEYS",
    "VIT_ARCHS",
    "Attention",
    "Block",
    "CheckpointError",
    "FeatureSpec",
    "LayerScale",
    "LoadReport",
    "Mlp",
    "UnsafeCheckpointError",
    "VisionTransformer",
    "atomic_torch_save",
    "atomic_write",
    "create_vit",
    "layer_decay_param_groups",
    "list_models",
    "load_checkpoint",
    "lr_scale",
    "read_checkpoint",
    "resample_abs_pos_embed",
    "resample_beit_rel_pos",
    "resample_patch_embed",
    "resample_rel_pos",
    "safe_torch_load",
    "save_checkpoint",
    "sincos_2d_pos_embed",
    "write_checkpoint",
]
