"""The MAE model: official key layout, equality with an official-structured reference, loss rules."""
from __future__ import annotations

from functools import partial

import pytest
import torch
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block as TimmBlock
from torch import nn

from mae_backbone import create_vit, sincos_2d_pos_embed
from pretrain import MAE_ARCHS, create_mae, load_mae
from pretrain.optim import build_optimizer
from training.schedule import absolute_lr, lr_at

BLOCK_KEYS = ["norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight",
              "attn.proj.bias", "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias",
              "mlp.fc2.weight", "mlp.fc2.bias"]


def official_keys(depth: int, decoder_depth: int) -> set[str]:
    keys = {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight",
            "norm.bias", "mask_token", "decoder_pos_embed", "decoder_embed.weight", "decoder_embed.bias",
            "decoder_norm.weight", "decoder_norm.bias", "decoder_pred.weight", "decoder_pred.bias"}
    keys |= {f"blocks.{i}.{k}" for i in range(depth) for k in BLOCK_KEYS}
    keys |= {f"decoder_blocks.{i}.{k}" for i in range(decoder_depth) for k in BLOCK_KEYS}
    return keys


@pytest.mark.parametrize("name", list(MAE_ARCHS))
def test_registry_sizes_have_the_official_layout(name):
    with torch.device("meta"):
        model = create_mae(name)
    sd = model.state_dict()
    assert set(sd) == official_keys(model.depth, 8)
    p = model.patch_size
    grid = 224 // p
    assert sd["decoder_pred.weight"].shape == (p * p * 3, 512)
    assert sd["decoder_pos_embed"].shape == (1, grid * grid + 1, 512)
    assert sd["mask_token"].shape == (1, 1, 512)
    assert model.decoder_blocks[0].attn.num_heads == 16
    assert not model.pos_embed.requires_grad and not model.decoder_pos_embed.requires_grad


class OfficialStyleMAE(nn.Module):
    """An independent reference written from the paper / official code structure, on timm's blocks."""

    def __init__(self, img_size, patch_size, embed_dim, depth, num_heads, dec_dim, dec_depth, dec_heads, norm_pix):
        super().__init__()
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.patch_embed = PatchEmbed(img_size, patch_size, 3, embed_dim)
        n = self.patch_embed.num_patches
        self.p = patch_size
        self.cls_token = nn.Parameter(torch.randn(1, 1, embed_dim) * 0.02)
        self.pos_embed = nn.Parameter(sincos_2d_pos_embed(embed_dim, img_size // patch_size, True)[None], requires_grad=False)
        self.blocks = nn.ModuleList(TimmBlock(embed_dim, num_heads, 4.0, qkv_bias=True, norm_layer=norm) for _ in range(depth))
        self.norm = norm(embed_dim)
        self.decoder_embed = nn.Linear(embed_dim, dec_dim)
        self.mask_token = nn.Parameter(torch.randn(1, 1, dec_dim) * 0.02)
        self.decoder_pos_embed = nn.Parameter(sincos_2d_pos_embed(dec_dim, img_size // patch_size, True)[None], requires_grad=False)
        self.decoder_blocks = nn.ModuleList(TimmBlock(dec_dim, dec_heads, 4.0, qkv_bias=True, norm_layer=norm) for _ in range(dec_depth))
        self.decoder_norm = norm(dec_dim)
        self.decoder_pred = nn.Linear(dec_dim, patch_size**2 * 3)
        self.norm_pix = norm_pix
        with torch.no_grad():  # non-trivial norms so that layout mistakes show
            for m in self.modules():
                if isinstance(m, nn.LayerNorm):
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.1, 0.1)

    def forward(self, imgs, mask_ratio, noise):
        x = self.patch_embed(imgs) + self.pos_embed[:, 1:, :]
        N, L, D = x.shape
        len_keep = int(L * (1 - mask_ratio))
        ids_shuffle = torch.argsort(noise, dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        x = torch.gather(x, 1, ids_shuffle[:, :len_keep].unsqueeze(-1).repeat(1, 1, D))
        mask = torch.ones(N, L)
        mask[:, :len_keep] = 0
        mask = torch.gather(mask, 1, ids_restore)
        x = torch.cat([(self.cls_token + self.pos_embed[:, :1]).expand(N, -1, -1), x], dim=1)
        for blk in self.blocks:
            x = blk(x)
        x = self.decoder_embed(self.norm(x))
        toks = self.mask_token.repeat(N, L + 1 - x.shape[1], 1)
        x_ = torch.cat([x[:, 1:], toks], dim=1)
        x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).repeat(1, 1, x.shape[2]))
        x = torch.cat([x[:, :1], x_], dim=1) + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        pred = self.decoder_pred(self.decoder_norm(x))[:, 1:]
        p, h = self.p, imgs.shape[2] // self.p
        target = torch.einsum("nchpwq->nhwpqc", imgs.reshape(N, 3, h, p, h, p)).reshape(N, h * h, p * p * 3)
        if self.norm_pix:
            target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
        loss = ((pred - target) ** 2).mean(-1)
        return (loss * mask).sum() / mask.sum(), pred, mask


@pytest.mark.parametrize("norm_pix", [False, True])
def test_official_checkpoint_loads_strictly_and_reproduces_reconstructions(tmp_path, norm_pix):
    torch.manual_seed(0)
    ref = OfficialStyleMAE(32, 16, 192, 12, 3, 64, 2, 16, norm_pix).eval()
    path = tmp_path / "mae_pretrain_official.pth"
    torch.save({"model": ref.state_dict()}, path)
    model, how = load_mae(path, target="norm_pixel" if norm_pix else None)
    assert "command line" in how if norm_pix else "assumed pixel" in how
    assert model.encoder_name == "vit_tiny_patch16" and model.decoder_depth == 2 and model.decoder_embed_dim == 64
    imgs = torch.randn(3, 3, 32, 32)
    noise = torch.rand(3, 4)
    with torch.no_grad():
        ref_out = ref(imgs, 0.5, noise)
        out = model(imgs, 0.5, noise=noise)
    for a, b in zip(out, ref_out):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    ours = create_mae("mae_vit_tiny_patch16", img_size=32, decoder_embed_dim=64, decoder_depth=2)
    ref.load_state_dict(ours.state_dict(), strict=True)  # and our keys load into the official structure


def test_loss_counts_only_masked_patches(tiny_mae):
    model = tiny_mae(target="pixel")
    imgs = torch.randn(2, 3, 32, 32)
    pred = torch.randn(2, 16, 192)
    mask = (torch.rand(2, 16) < 0.75).float()
    mask[:, 0], mask[:, 1] = 1.0, 0.0
    base = model.forward_loss(imgs, pred, mask)
    visible = pred.clone()
    visible[mask == 0] += 100.0
    assert torch.equal(model.forward_loss(imgs, visible, mask), base)
    hidden = pred.clone()
    hidden[:, 0] += 1.0
    assert model.forward_loss(imgs, hidden, mask) > base
    # the mean over masked patches of the per-patch MSE
    per_patch = ((pred - model.patchify(imgs)) ** 2).mean(-1)
    torch.testing.assert_close(base, per_patch[mask == 1].mean())


def test_norm_pixel_target_normalizes_each_patch(tiny_mae):
    model = tiny_mae(target="norm_pixel")
    imgs = torch.randn(2, 3, 32, 32) * 3 + 1
    t = model.patch_target(imgs)
    patches = model.patchify(imgs)
    mean = patches.mean(-1, keepdim=True)
    std = (patches.var(-1, unbiased=True, keepdim=True) + 1e-6).sqrt()
    torch.testing.assert_close(t, (patches - mean) / std)
    torch.testing.assert_close(t.mean(-1), torch.zeros(2, 16), atol=1e-5, rtol=0)
    mask = torch.ones(2, 16)
    assert model.forward_loss(imgs, t, mask) < 1e-10
    assert model.forward_loss(imgs, patches, mask) > 0.1  # raw pixels are not the target any more


def test_patchify_unpatchify_round_trip_and_layout(tiny_mae):
    model = tiny_mae()
    imgs = torch.randn(2, 3, 32, 48)
    x = model.patchify(imgs)
    assert x.shape == (2, 4 * 6, 8 * 8 * 3)
    # patch (i, j) = pixels [i*p:(i+1)*p, j*p:(j+1)*p], ordered (row, column, channel)
    i, j = 2, 5
    expected = imgs[:, :, i * 8 : (i + 1) * 8, j * 8 : (j + 1) * 8].permute(0, 2, 3, 1).reshape(2, -1)
    assert torch.equal(x[:, i * 6 + j], expected)
    assert torch.equal(model.unpatchify(x, (4, 6)), imgs)


def test_mask_tokens_in_the_encoder_variant(tiny_mae):
    model = tiny_mae(encoder_mask_tokens=True)
    sd = model.state_dict()
    assert "encoder_mask_token" in sd and "mask_token" not in sd
    imgs = torch.randn(2, 3, 32, 32)
    noise = torch.rand(2, 16)
    latent, mask, _ = model.forward_encoder(imgs, 0.75, noise)
    assert latent.shape == (2, 17, 32)  # every patch goes through the encoder
    loss, pred, mask = model(imgs, 0.75, noise=noise)
    loss.backward()
    assert model.encoder_mask_token.grad is not None and model.encoder_mask_token.grad.abs().sum() > 0
    # masked patches enter as the mask token: their pixels cannot change the encoder output
    imgs2 = imgs.clone()
    m_img = model.unpatchify(mask.unsqueeze(-1).expand(-1, -1, 192)).bool()
    imgs2[m_img] = 5.0
    with torch.no_grad():
        a, _, _ = model.forward_encoder(imgs, 0.75, noise)
        b, _, _ = model.forward_encoder(imgs2, 0.75, noise)
    torch.testing.assert_close(a, b)
    assert "encoder_mask_token" not in model.encoder_state_dict()


def test_encoder_weights_load_into_the_backbone(tiny_mae):
    model = tiny_mae()
    enc = model.encoder_state_dict()
    assert not any(k.startswith("decoder_") or k == "mask_token" for k in enc)
    vit = create_vit("vit_tiny_patch16", img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2)
    vit.load_state_dict(enc, strict=True)
    imgs = torch.randn(1, 3, 32, 32)
    noise = torch.arange(16.0)[None]  # keep patches 0..3
    with torch.no_grad():
        latent, _, _ = model.forward_encoder(imgs, 0.75, noise)
        # the same patches through the plain backbone, token by token
        x, hw = vit.prepare_tokens(imgs)
        x = torch.cat([x[:, :1], x[:, 1:5]], dim=1)
        for blk in vit.blocks:
            x = blk(x, hw, 1)
        torch.testing.assert_close(vit.norm(x), latent)


def test_optimizer_groups_decay_as_the_official_pretraining():
    """Official ``main_pretrain.py``: timm's ``param_groups_weight_decay(model, wd)`` with no skip
    list, so only 1-D parameters (norms, biases) are exempt; the class and mask tokens are decayed."""
    from timm.optim import param_groups_weight_decay

    model = create_mae("mae_vit_tiny_patch16", img_size=32, patch_size=8, depth=1, embed_dim=32, num_heads=2,
                       decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.05)
    wd = {n: g["weight_decay"] for g in opt.param_groups for n in g["param_names"]}
    assert opt.defaults["betas"] == (0.9, 0.95)
    names = {id(p): n for n, p in model.named_parameters()}
    official = {names[id(p)]: g["weight_decay"] for g in param_groups_weight_decay(model, 0.05) for p in g["params"]}
    assert wd == official
    for name in ("norm.weight", "norm.bias", "blocks.0.attn.qkv.bias", "decoder_norm.weight", "decoder_pred.bias",
                 "patch_embed.proj.bias"):
        assert wd[name] == 0.0, name
    for name in ("cls_token", "mask_token", "blocks.0.attn.qkv.weight", "decoder_pred.weight",
                 "patch_embed.proj.weight", "decoder_embed.weight"):
        assert wd[name] == 0.05, name
    assert "pos_embed" not in wd and "decoder_pos_embed" not in wd  # fixed sin-cos, not trained
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(wd) == trainable


def test_lr_schedule_warmup_cosine_and_scaling():
    assert absolute_lr(1.5e-4, 4096) == pytest.approx(2.4e-3)
    assert lr_at(0, 1.0, 0.0, 10, 110) == 0.0
    assert lr_at(5, 1.0, 0.0, 10, 110) == pytest.approx(0.5)
    assert lr_at(10, 1.0, 0.0, 10, 110) == pytest.approx(1.0)
    assert lr_at(60, 1.0, 0.1, 10, 110) == pytest.approx(0.55)
    assert lr_at(110, 1.0, 0.1, 10, 110) == pytest.approx(0.1)
    values = [lr_at(s, 1.0, 0.0, 10, 110) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))
