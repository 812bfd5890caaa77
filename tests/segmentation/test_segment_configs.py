"""Every shipped ADE20K config against the published recipe, value by value.

Sources of the expected values (written here, not parsed at test time):
- [MMSEG-MAE] MMSeg 1.2.2 ``configs/mae/mae-base_upernet_8xb2-amp-160k_ade20k-512x512.py`` with its
  ``_base_`` files (48.13 mIoU, ``configs/mae/metafile.yaml``): the MAE paper's ViT-B recipe;
- [MAE-A4] the MAE paper, appendix A.4 and Table 5: UperNet following BEiT's segmentation code,
  160k iterations, batch 16, relative position bias "turned on during transfer learning,
  initialized as zero" for a fair comparison (so for every entry), lr searched per entry;
- [BEIT-L] the published ViT-L UperNet ADE20K recipe: BEiT's
  ``beit/semantic_segmentation/configs/beit/upernet/upernet_beit_large_24_512_slide_160k_ade20k.py``
  (microsoft/unilm) and MMSeg 1.2.2's ``configs/beit/beit-large_upernet_8xb1-amp-160k_ade20k-640x640.py``:
  layer decay 0.95 over 24 layers, AdamW lr 2e-5, drop path 0.2, outputs [7, 11, 15, 23].
The installed MMSeg configs are also loaded and compared where they exist (same numbers, read from
MMSeg's own files): an independent check that the table above is what MMSeg ships.
"""
from __future__ import annotations

from pathlib import Path

import mmseg
import pytest
from mmengine.config import Config

from mae_backbone import VIT_ARCHS
from segmentation import CONFIG_DIR, load_config

MMSEG_CONFIGS = Path(mmseg.__file__).parent / ".mim" / "configs"
B, L = "upernet-mae-vit-b_8xb2-160k_ade20k-512x512.py", "upernet-mae-vit-l_8xb2-160k_ade20k-512x512.py"
MOCO, SUP = "upernet-mocov3-vit-b_8xb2-160k_ade20k-512x512.py", "upernet-sup-vit-b_8xb2-160k_ade20k-512x512.py"

# ---- the ViT-B recipe [MMSEG-MAE], shared by the MAE, MoCo v3 and supervised ViT-B configs [MAE-A4]
RECIPE_B = {
    "model.backbone.arch": "base",                    # 768 wide, 12 blocks, 12 heads, patch 16
    "model.backbone.img_size": 512,                   # img_size=(512, 512)
    "model.backbone.out_indices": [3, 5, 7, 11],
    "model.backbone.drop_path_rate": 0.1,
    "model.backbone.use_rel_pos": "beit",             # BEiT table per block, zero-init [MAE-A4]
    "model.backbone.init_values": 1.0,                # layer scale gamma_1/gamma_2
    "model.backbone.norm_out": False,                 # final_norm=False
    "model.backbone.window_size": 0,                  # global attention
    "model.neck.type": "Feature2Pyramid",
    "model.neck.embed_dim": 768,
    "model.neck.rescales": [4, 2, 1, 0.5],
    "model.decode_head.type": "UPerHead",
    "model.decode_head.in_channels": [768, 768, 768, 768],
    "model.decode_head.in_index": [0, 1, 2, 3],
    "model.decode_head.pool_scales": (1, 2, 3, 6),
    "model.decode_head.channels": 768,
    "model.decode_head.dropout_ratio": 0.1,
    "model.decode_head.num_classes": 150,
    "model.decode_head.loss_decode.loss_weight": 1.0,
    "model.auxiliary_head.type": "FCNHead",
    "model.auxiliary_head.in_channels": 768,
    "model.auxiliary_head.in_index": 2,               # level 2 of the pyramid
    "model.auxiliary_head.channels": 256,
    "model.auxiliary_head.num_convs": 1,
    "model.auxiliary_head.concat_input": False,
    "model.auxiliary_head.num_classes": 150,
    "model.auxiliary_head.loss_decode.loss_weight": 0.4,
    "model.decode_head.norm_cfg.type": "SyncBN",
    "model.data_preprocessor.size": (512, 512),
    "model.data_preprocessor.mean": [123.675, 116.28, 103.53],
    "model.data_preprocessor.std": [58.395, 57.12, 57.375],
    "model.test_cfg.mode": "slide",
    "model.test_cfg.crop_size": (512, 512),
    "model.test_cfg.stride": (341, 341),
    "optim_wrapper.optimizer.type": "AdamW",
    "optim_wrapper.optimizer.lr": 1e-4,
    "optim_wrapper.optimizer.betas": (0.9, 0.999),
    "optim_wrapper.optimizer.weight_decay": 0.05,
    "optim_wrapper.paramwise_cfg.layer_decay": 0.65,  # num_layers=12, layer_decay_rate=0.65
    "param_scheduler[0].type": "LinearLR",            # warmup 1500 iterations from 1e-6
    "param_scheduler[0].start_factor": 1e-6,
    "param_scheduler[0].begin": 0,
    "param_scheduler[0].end": 1500,
    "param_scheduler[0].by_epoch": False,
    "param_scheduler[1].type": "PolyLR",              # then poly, power 1.0, to 0 at 160k
    "param_scheduler[1].power": 1.0,
    "param_scheduler[1].eta_min": 0.0,
    "param_scheduler[1].begin": 1500,
    "param_scheduler[1].end": 160000,
    "param_scheduler[1].by_epoch": False,
    "train_cfg.max_iters": 160000,
    "train_dataloader.batch_size": 2,                 # x 8 GPUs = 16 [MAE-A4]
    "crop_size": (512, 512),
}
# ---- ViT-L [BEIT-L] (the MAE paper publishes no ViT-L hyper-parameters; MMSeg ships no MAE ViT-L)
RECIPE_L = {
    **RECIPE_B,
    "model.backbone.arch": "large",
    "model.backbone.out_indices": [7, 11, 15, 23],
    "model.backbone.drop_path_rate": 0.2,
    "model.neck.embed_dim": 1024,
    "model.decode_head.in_channels": [1024, 1024, 1024, 1024],
    "model.decode_head.channels": 1024,
    "model.auxiliary_head.in_channels": 1024,
    "optim_wrapper.optimizer.lr": 2e-5,
    "optim_wrapper.paramwise_cfg.layer_decay": 0.95,  # num_layers=24, layer_decay_rate=0.95
}
CONFIGS = {
    B: (RECIPE_B, "checkpoints/mae_pretrain_vit_base.pth"),
    L: (RECIPE_L, "checkpoints/mae_pretrain_vit_large.pth"),
    MOCO: (RECIPE_B, "checkpoints/mocov3_vit-b-300ep.pth.tar"),
    SUP: (RECIPE_B, "checkpoints/deit_base_patch16_224-b5f2ef4d.pth"),
}


def lookup(cfg: Config, dotted: str):
    node = cfg
    for part in dotted.replace("[", ".[").split("."):
        node = node[int(part[1:-1])] if part.startswith("[") else node[part]
    return node


def test_every_shipped_config_is_in_the_table():
    shipped = sorted(p.name for p in CONFIG_DIR.glob("*.py"))
    assert shipped == sorted(CONFIGS)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_config_equals_the_published_recipe(name):
    recipe, checkpoint = CONFIGS[name]
    cfg = load_config(CONFIG_DIR / name)
    wrong = {k: (lookup(cfg, k), v) for k, v in recipe.items() if lookup(cfg, k) != v}
    assert not wrong, f"{name}: (config, published) {wrong}"
    assert cfg.model.pretrained == checkpoint
    assert "weight_decay_rule" not in cfg.optim_wrapper.paramwise_cfg  # MMSeg's rule, the default
    assert cfg.optim_wrapper.constructor == "ViTLayerDecayOptimizerConstructor"


def test_the_vit_l_layer_decay_is_not_the_b_decay_over_24_blocks():
    """The issue's arithmetic: 0.65 over 24 blocks would scale the patch embedding's lr by 0.65**25."""
    cfg = load_config(CONFIG_DIR / L)
    depth = VIT_ARCHS["vit_large_patch16"]["depth"]
    stem = cfg.optim_wrapper.paramwise_cfg.layer_decay ** (depth + 1)
    assert 0.65 ** (depth + 1) == pytest.approx(2.1e-5, rel=0.02)
    assert stem == pytest.approx(0.277, rel=0.01)


# --------------------------------------------------------------------------- against MMSeg's own files
def _mmseg_config(rel: str) -> Config:
    path = MMSEG_CONFIGS / rel
    if not path.is_file():
        pytest.skip(f"this mmseg install ships no {rel}")
    return Config.fromfile(str(path))


def test_b_recipe_equals_the_installed_mmseg_mae_config():
    theirs = _mmseg_config("mae/mae-base_upernet_8xb2-amp-160k_ade20k-512x512.py")
    ours = load_config(CONFIG_DIR / B)
    bb = theirs.model.backbone
    assert (bb.type, bb.embed_dims, bb.num_layers, bb.num_heads, bb.patch_size) == ("MAE", 768, 12, 12, 16)
    assert bb.norm_cfg == dict(type="LN", eps=1e-6)  # ours: LayerNorm eps 1e-6, MAE's
    assert not bb.get("final_norm", False)
    assert (tuple(bb.img_size), bb.init_values, bb.drop_path_rate, list(bb.out_indices)) == (
        (ours.model.backbone.img_size,) * 2, ours.model.backbone.init_values, ours.model.backbone.drop_path_rate,
        ours.model.backbone.out_indices)
    for key in ("neck.embed_dim", "neck.rescales", "decode_head.in_channels", "decode_head.in_index",
                "decode_head.pool_scales", "decode_head.channels", "decode_head.dropout_ratio",
                "decode_head.num_classes", "auxiliary_head.in_channels", "auxiliary_head.in_index",
                "auxiliary_head.channels", "auxiliary_head.num_convs", "auxiliary_head.concat_input",
                "auxiliary_head.loss_decode.loss_weight", "test_cfg", "data_preprocessor.mean",
                "data_preprocessor.std", "data_preprocessor.size", "decode_head.norm_cfg"):
        assert lookup(ours.model, key) == lookup(theirs.model, key), key
    assert ours.optim_wrapper.optimizer == theirs.optim_wrapper.optimizer
    assert theirs.optim_wrapper.paramwise_cfg == dict(num_layers=12, layer_decay_rate=0.65)
    assert ours.optim_wrapper.paramwise_cfg.layer_decay == 0.65  # over depth 12: MAEViT.num_layers
    assert ours.param_scheduler == theirs.param_scheduler
    assert ours.train_dataloader.batch_size == theirs.train_dataloader.batch_size == 2
    assert ours.train_cfg.max_iters == theirs.train_cfg.max_iters == 160000
    assert ours.train_pipeline[2:-1] == theirs.train_pipeline[2:-1]  # resize, crop, flip, photometric
    assert ours.test_pipeline == theirs.test_pipeline


def test_l_optimizer_equals_the_installed_mmseg_beit_large_config():
    theirs = _mmseg_config("beit/beit-large_upernet_8xb1-amp-160k_ade20k-640x640.py")
    ours = load_config(CONFIG_DIR / L)
    assert theirs.optim_wrapper.paramwise_cfg == dict(num_layers=24, layer_decay_rate=0.95)
    assert ours.optim_wrapper.paramwise_cfg.layer_decay == 0.95
    assert ours.optim_wrapper.optimizer == theirs.optim_wrapper.optimizer  # AdamW 2e-5, (0.9, 0.999), 0.05
    bb = theirs.model.backbone
    assert (bb.embed_dims, bb.num_layers, bb.num_heads) == (1024, 24, 16)
    assert (bb.drop_path_rate, list(bb.out_indices)) == (ours.model.backbone.drop_path_rate,
                                                         ours.model.backbone.out_indices)
    assert theirs.model.decode_head.channels == ours.model.decode_head.channels == 1024
