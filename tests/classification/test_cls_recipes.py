"""The shipped classification and pretraining recipes hold the published values, one table test each.

Expected values are written here with their source (not read from REFERENCE.md at test time):
- MAE paper (He et al., arXiv 2111.06377), appendix A.1 (pretraining, fine-tuning, linear probing);
- the official MAE repository's FINETUNE.md / PRETRAIN.md scripts and ``main_*.py`` defaults, which
  set the per-size fine-tuning values (ViT-L drop path 0.2, ViT-H 0.3) and the per-GPU batches;
- the project's ../shared/REFERENCE.md section "The MAE recipe", which transcribes both.
Published batches are global (1024 / 16384 / 4096); ours are per process, and the learning rate
follows the linear scaling rule, so the published absolute lr is reached at the published batch.
"""
from __future__ import annotations

import pytest
import torch

from classification import make_config
from classification.models import build_classifier, linear_probe_head
from classification.optim import build_optimizer as cls_optimizer
from training.schedule import absolute_lr, lr_at

FT_COMMON = {  # FINETUNE.md (all sizes) / paper Table 9 (A.1)
    "weight_decay": 0.05, "smoothing": 0.1, "mixup": 0.8, "cutmix": 1.0, "reprob": 0.25,
    "aa": "rand-m9-mstd0.5-inc1",  # RandAug (9, 0.5), timm's string as in main_finetune.py's default
    "pool": "avg",  # --global_pool
    "warmup_epochs": 5, "min_lr": 1e-6,  # main_finetune.py defaults
    "ema_decay": None,  # no EMA in the MAE fine-tuning recipe (EMA is the scratch recipe's, Table 11)
}
FT_BY_ARCH = {  # FINETUNE.md scripts
    "vit_base_patch16": dict(epochs=100, blr=5e-4, layer_decay=0.65, drop_path=0.1),
    "vit_large_patch16": dict(epochs=50, blr=1e-3, layer_decay=0.75, drop_path=0.2),
    "vit_huge_patch14": dict(epochs=50, blr=1e-3, layer_decay=0.75, drop_path=0.3),
}
LINPROBE = {  # FINETUNE.md "Linear Probing" / main_linprobe.py / paper A.1
    "epochs": 90, "blr": 0.1, "weight_decay": 0.0, "pool": "cls", "warmup_epochs": 10, "min_lr": 0.0,
    "batch_size": 512,  # per GPU; x 32 GPUs = 16384
}
PRETRAIN = {  # paper A.1 / PRETRAIN.md / main_pretrain.py
    "mask_ratio": 0.75, "masking": "random", "target": "norm_pixel", "encoder_mask_tokens": False,
    "decoder_depth": 8, "decoder_dim": 512, "decoder_heads": 16, "blr": 1.5e-4, "weight_decay": 0.05,
    "warmup_epochs": 40, "min_lr": 0.0, "aug": "crop_rand", "model": "mae_vit_base_patch16",
    "batch_size": 64,  # per GPU; x 64 GPUs = 4096
}


def _cfg(protocol: str, arch: str):
    return make_config(protocol, {"data": "d", "output": "o"}).resolve(arch)


@pytest.mark.parametrize("arch", list(FT_BY_ARCH))
def test_finetune_recipe_per_size(arch):
    cfg = _cfg("finetune", arch)
    want = {**FT_COMMON, **FT_BY_ARCH[arch]}
    assert {k: getattr(cfg, k) for k in want} == want


def test_finetune_lr_and_optimizer():
    # paper: lr = blr x batch / 256 at batch 1024 -> 2e-3 for ViT-B
    assert absolute_lr(5e-4, 1024) == pytest.approx(2e-3)
    # AdamW with torch's default betas (0.9, 0.999), as main_finetune.py; layer decay: the patch
    # embedding (layer 0 of depth + 2 layers) gets ld ** (depth + 1) of the lr
    model = build_classifier("vit_tiny_patch16", 3, img_size=32, model_kwargs={"depth": 2})
    opt = cls_optimizer(model, "finetune", lr=1.0, weight_decay=0.05, layer_decay=0.65)
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["betas"] == (0.9, 0.999)
    by_name = {n: g for g in opt.param_groups for n in g["param_names"]}
    assert by_name["patch_embed.proj.weight"]["lr_scale"] == pytest.approx(0.65**3)
    assert by_name["blocks.1.mlp.fc1.weight"]["lr_scale"] == pytest.approx(0.65)
    assert by_name["head.weight"]["lr_scale"] == 1.0
    # wd 0.05 on matrices; none on norms, biases, pos_embed, cls_token (model.no_weight_decay(), main_finetune.py)
    assert by_name["blocks.0.attn.qkv.weight"]["weight_decay"] == 0.05
    for name in ("blocks.0.norm1.weight", "blocks.0.attn.qkv.bias", "pos_embed", "cls_token"):
        assert by_name[name]["weight_decay"] == 0.0, name


def test_linprobe_recipe():
    cfg = _cfg("linprobe", "vit_base_patch16")
    assert {k: getattr(cfg, k) for k in LINPROBE} == LINPROBE
    assert absolute_lr(0.1, 16384) == pytest.approx(6.4)
    head = linear_probe_head(768, 10)  # BatchNorm1d without affine, eps 1e-6, then the linear head
    assert isinstance(head[0], torch.nn.BatchNorm1d) and not head[0].affine and head[0].eps == 1e-6
    from timm.optim import Lars

    model = build_classifier("vit_tiny_patch16", 3, protocol="linprobe", global_pool=False, img_size=32,
                             model_kwargs={"depth": 1})
    for p in model.parameters():
        p.requires_grad_(False)
    for p in model.head.parameters():
        p.requires_grad_(True)
    opt = cls_optimizer(model, "linprobe", lr=1.0, weight_decay=0.0)
    assert isinstance(opt, Lars) and opt.defaults["momentum"] == 0.9
    assert all(g["weight_decay"] == 0.0 for g in opt.param_groups)


def test_pretrain_recipe():
    from pretrain import PretrainConfig, build_transform
    from pretrain.optim import build_optimizer as mae_optimizer
    from pretrain.model import create_mae

    cfg = PretrainConfig(data="d", output="o")
    assert {k: getattr(cfg, k) for k in PRETRAIN} == PRETRAIN
    assert absolute_lr(1.5e-4, 4096) == pytest.approx(2.4e-3)
    # AdamW (0.9, 0.95)
    mae = create_mae("mae_vit_tiny_patch16", img_size=32, patch_size=8, depth=1, decoder_depth=1,
                     decoder_embed_dim=32, decoder_num_heads=2)
    assert mae_optimizer(mae, lr=1.0).defaults["betas"] == (0.9, 0.95)
    # the 8 x 512 decoder with 16 heads by default
    with torch.device("meta"):
        full = create_mae("mae_vit_base_patch16")
    assert (full.decoder_depth, full.decoder_embed_dim, full.decoder_blocks[0].attn.num_heads) == (8, 512, 16)
    assert full.target == "norm_pixel" and full.masking == "random"
    # RandomResizedCrop(224, scale (0.2, 1.0), bicubic) + flip only
    from torchvision import transforms as T

    steps = build_transform(cfg.aug, 224).transforms
    assert isinstance(steps[0], T.RandomResizedCrop) and steps[0].scale == (0.2, 1.0)
    assert steps[0].interpolation == T.InterpolationMode.BICUBIC
    assert [type(s) for s in steps[1:]] == [T.RandomHorizontalFlip, T.ToTensor, T.Normalize]
    # cosine after linear warmup (util/lr_sched.py): 0 -> lr over the warmup, half-cosine to min_lr
    assert lr_at(0, 1.0, 0.0, 40, 840) == 0.0 and lr_at(20, 1.0, 0.0, 40, 840) == pytest.approx(0.5)
    assert lr_at(40, 1.0, 0.0, 40, 840) == 1.0 and lr_at(440, 1.0, 0.0, 40, 840) == pytest.approx(0.5)
    assert lr_at(840, 1.0, 0.0, 40, 840) == pytest.approx(0.0)
