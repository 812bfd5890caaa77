"""The dense-task options of the one ViT that the published transfer recipes use.

- ViTDet keeps the absolute position table at the pretraining size and interpolates it on every
  forward (``pretrain_img_size``);
- MMSeg's MAE config (BEiT's options) adds a relative position bias table per block, with the
  class-token entries, and layer scale (``rel_pos="beit"``, ``init_values``).

Each reference below is written out from the papers' formulas, independently of the model code
(the upstream implementations themselves are compared in tests/detection and tests/segmentation).
"""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

import mae_backbone
from mae_backbone import CheckpointError, create_vit, load_checkpoint, save_checkpoint


def _randomize(model: torch.nn.Module) -> None:
    """Every parameter random (tables, layer scales, norms), so every term shows in the outputs."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * (0.5 if "table" in name or "gamma" in name else 0.1)
                    + (1.0 if name.endswith("norm1.weight") or name.endswith("norm2.weight") else 0.0))


# ------------------------------------------------------------------ ViTDet's absolute position table
def test_pretrain_img_size_keeps_the_table_and_interpolates_every_forward():
    torch.manual_seed(0)
    vit = create_vit("vit_tiny_patch16", depth=2, img_size=128, pretrain_img_size=48, window_size=4,
                     global_blocks=(1,), rel_pos=True, dense_cls=False, pos_embed_learnable=True).eval()
    _randomize(vit)
    assert vit.pos_embed.shape == (1, 1 + 3 * 3, 192) and vit.pos_grid_size == (3, 3)
    assert vit.grid_size == (8, 8) and vit.blocks[1].attn.rel_pos_h.shape == (2 * 8 - 1, 64)  # global block
    x = torch.randn(1, 3, 112, 80)
    with torch.no_grad():
        tokens, hw = vit.patch_embed(x)
        grid = vit.pos_embed[:, 1:].reshape(1, 3, 3, -1).permute(0, 3, 1, 2)
        pos = F.interpolate(grid, size=hw, mode="bicubic", align_corners=False).flatten(2).transpose(1, 2)
        y = tokens + pos
        for blk in vit.blocks:
            y = blk(y, hw, 0)
        want = y.transpose(1, 2).reshape(1, 192, *hw)
        torch.testing.assert_close(vit.forward_intermediates(x, [1])[0], want, rtol=1e-5, atol=1e-5)
    # the gradient reaches the pretraining-size table
    vit.forward_intermediates(x, [1])[0].sum().backward()
    assert vit.pos_embed.grad.shape == (1, 10, 192) and vit.pos_embed.grad[:, 1:].abs().sum() > 0


def test_a_pretraining_size_table_loads_unchanged_and_round_trips(tmp_path):
    src = create_vit("vit_tiny_patch16", depth=2, img_size=48)
    _randomize(src)
    det = create_vit("vit_tiny_patch16", depth=2, img_size=128, pretrain_img_size=48, window_size=4,
                     global_blocks=(1,), rel_pos=True, dense_cls=False, pos_embed_learnable=True)
    report = load_checkpoint(det, src.state_dict(), allow_missing=mae_backbone.REL_POS_KEYS)
    assert "pos_embed" not in report.resampled and "pos_embed" in report.loaded
    assert torch.equal(det.pos_embed, src.pos_embed)
    # saved and read back: the stored size is the table's (48), so nothing is resampled
    path = save_checkpoint(det, tmp_path / "det.safetensors")
    again = create_vit("vit_tiny_patch16", depth=2, img_size=128, pretrain_img_size=48, window_size=4,
                       global_blocks=(1,), rel_pos=True, dense_cls=False)
    assert load_checkpoint(again, path, allow_unexpected=("cls_token",)).resampled == {}
    assert torch.equal(again.pos_embed, src.pos_embed)


# ------------------------------------------------------------------ BEiT relative position bias
def _beit_bias_reference(table: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """BEiT's bias, pair by pair: [heads, 1+h*w, 1+h*w] (offsets row-major over (dh, dw); then
    the cls->token, token->cls, cls->cls entries)."""
    n_off = (2 * h - 1) * (2 * w - 1)
    n = 1 + h * w
    bias = torch.empty(table.shape[1], n, n)
    cells = list(itertools.product(range(h), range(w)))
    for a, (i1, j1) in enumerate(cells, start=1):
        for b, (i2, j2) in enumerate(cells, start=1):
            bias[:, a, b] = table[(i1 - i2 + h - 1) * (2 * w - 1) + (j1 - j2 + w - 1)]
    bias[:, 0, :] = table[n_off][:, None]      # class token attending to anything
    bias[:, :, 0] = table[n_off + 1][:, None]  # anything attending to the class token
    bias[:, 0, 0] = table[n_off + 2]
    return bias


def _beit_block_reference(blk, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """A BEiT block written out: x + g1 * attn(ln1 x), then x + g2 * mlp(ln2 x)."""
    attn = blk.attn
    b, n, d = x.shape
    y = blk.norm1(x)
    q, k, v = (y @ attn.qkv.weight.T + attn.qkv.bias).reshape(b, n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    logits = (q * attn.head_dim**-0.5) @ k.transpose(-2, -1) + _beit_bias_reference(
        attn.relative_position_bias_table, *hw)
    y = (logits.softmax(-1) @ v).transpose(1, 2).reshape(b, n, d) @ attn.proj.weight.T + attn.proj.bias
    x = x + blk.ls1.gamma * y
    return x + blk.ls2.gamma * blk.mlp(blk.norm2(x))


def test_beit_relative_bias_and_layer_scale_follow_the_formula():
    vit = create_vit("vit_tiny_patch16", depth=2, num_heads=3, img_size=(48, 64), rel_pos="beit",
                     init_values=0.1).eval()
    assert vit.blocks[0].attn.relative_position_bias_table.shape == ((2 * 3 - 1) * (2 * 4 - 1) + 3, 3)
    assert torch.equal(vit.blocks[1].ls2.gamma, torch.full((192,), 0.1))
    assert "blocks.0.attn.relative_position_index" not in vit.state_dict()  # derived, not stored
    _randomize(vit)
    x = torch.randn(2, 3, 48, 64)
    with torch.no_grad():
        y = vit.prepare_tokens(x)[0]
        for blk in vit.blocks:
            y = _beit_block_reference(blk, y, (3, 4))
        got = vit.forward_intermediates(x, [1])[0]
        torch.testing.assert_close(got, y[:, 1:].transpose(1, 2).reshape(2, 192, 3, 4), rtol=1e-5, atol=1e-5)


def test_beit_table_at_zero_and_unit_layer_scale_change_nothing():
    plain = create_vit("vit_tiny_patch16", depth=2, img_size=48).eval()
    _randomize(plain)
    beit = create_vit("vit_tiny_patch16", depth=2, img_size=48, rel_pos="beit", init_values=1.0).eval()
    report = load_checkpoint(beit, plain.state_dict(),
                             allow_missing=mae_backbone.REL_POS_KEYS + mae_backbone.LAYER_SCALE_KEYS)
    assert sorted(report.missing) == sorted(
        f"blocks.{i}.{k}" for i in range(2) for k in ("attn.relative_position_bias_table", "ls1.gamma", "ls2.gamma"))
    x = torch.randn(1, 3, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(beit(x), plain(x), rtol=1e-6, atol=1e-6)


def test_beit_table_resamples_for_other_grids_and_checkpoints():
    vit = create_vit("vit_tiny_patch16", depth=1, img_size=48, rel_pos="beit").eval()
    with torch.no_grad():
        vit.blocks[0].attn.relative_position_bias_table.fill_(0.3)
    # another input grid: a constant table stays constant (bicubic keeps constants), extra rows kept
    bias = vit.blocks[0].attn.beit_bias((4, 5))
    assert bias.shape == (3, 21, 21)
    torch.testing.assert_close(bias, torch.full_like(bias, 0.3))
    # a checkpoint made for a 2x2 grid loads into the 3x3 model with the report saying so
    small = create_vit("vit_tiny_patch16", depth=1, img_size=32, rel_pos="beit")
    report = load_checkpoint(vit, small.state_dict())
    assert "blocks.0.attn.relative_position_bias_table" in report.resampled
    bad = dict(small.state_dict())
    bad["blocks.0.attn.relative_position_bias_table"] = torch.zeros(13, 3)
    with pytest.raises(CheckpointError, match="relative_position_bias_table"):
        load_checkpoint(vit, bad)


def test_beit_bias_needs_the_class_token_and_global_attention():
    with pytest.raises(ValueError, match="global attention"):
        create_vit("vit_tiny_patch16", depth=2, img_size=64, rel_pos="beit", window_size=2)
    with pytest.raises(ValueError, match="rel_pos must be"):
        create_vit("vit_tiny_patch16", depth=1, img_size=64, rel_pos="relative")


def test_the_documented_loader_is_exported():
    from mae_backbone.checkpoint import load_checkpoint as strict_loader

    assert mae_backbone.load_checkpoint is strict_loader
    for name in ("read_checkpoint", "write_checkpoint", "save_checkpoint", "LoadReport"):
        assert name in mae_backbone.__all__ and hasattr(mae_backbone, name)
