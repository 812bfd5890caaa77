"""Sin-cos tables and the resampling of pos-embeds, patch kernels and rel-pos tables."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed as timm_resample_pos
from timm.layers import resample_patch_embed as timm_resample_patch

from mae_backbone import resample_abs_pos_embed, resample_patch_embed, resample_rel_pos, sincos_2d_pos_embed


def _mae_reference(dim: int, h: int, w: int) -> np.ndarray:
    """The MAE paper's table written out independently: [x-half | y-half], each [sin | cos]."""
    ys, xs = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    omega = 1.0 / 10000 ** (np.arange(dim // 4) / (dim / 4))

    def half(pos):
        ang = pos.reshape(-1, 1) * omega[None]
        return np.concatenate([np.sin(ang), np.cos(ang)], axis=1)

    return np.concatenate([half(xs.astype(np.float64)), half(ys.astype(np.float64))], axis=1)


@pytest.mark.parametrize("grid", [(7, 7), (4, 6)])
def test_sincos_matches_the_mae_formula(grid):
    table = sincos_2d_pos_embed(32, grid, cls_token=True)
    assert table.shape == (1 + grid[0] * grid[1], 32) and table.dtype == torch.float32
    assert torch.equal(table[0], torch.zeros(32))
    np.testing.assert_allclose(table[1:].numpy(), _mae_reference(32, *grid), atol=1e-7)


def test_sincos_rejects_bad_dims():
    with pytest.raises(ValueError, match="multiple of 4"):
        sincos_2d_pos_embed(30, 4)


@pytest.mark.parametrize("new", [(7, 7), (10, 12), (4, 5), (14, 3)])
@pytest.mark.parametrize("antialias", [False, True])
def test_pos_embed_resampling_matches_timm(new, antialias):
    pe = torch.randn(1, 1 + 49, 32)
    ours = resample_abs_pos_embed(pe, new, antialias=antialias)
    torch.testing.assert_close(ours, timm_resample_pos(pe, list(new), antialias=antialias), rtol=0, atol=1e-6)
    assert torch.equal(ours[:, :1], pe[:, :1])  # the class token is kept aside


def _official_interpolate(pos_embed: torch.Tensor, side: int, new: int) -> torch.Tensor:
    """The official MAE ``interpolate_pos_embed`` / ViTDet ``get_abs_pos`` kernel, written out:
    the grid tokens as a [1, D, side, side] image, plain bicubic, align_corners=False."""
    grid = pos_embed[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(new, new), mode="bicubic", align_corners=False)
    return torch.cat([pos_embed[:, :1], grid.flatten(2).transpose(1, 2)], dim=1)


def test_pos_embed_resampling_defaults_to_the_official_kernel():
    """MAE, ViTDet and MMSeg resample with plain bicubic; the anti-aliased (PIL-style) kernel that
    the default used to be differs by several percent of the table's scale at 14x14 -> 20x20."""
    torch.manual_seed(0)
    pe = torch.randn(1, 1 + 14 * 14, 32)
    ours = resample_abs_pos_embed(pe, (20, 20))
    torch.testing.assert_close(ours, _official_interpolate(pe, 14, 20), rtol=0, atol=1e-6)
    pil_style = resample_abs_pos_embed(pe, (20, 20), antialias=True)
    assert (pil_style - ours).abs().max() > 0.05 * pe.abs().max()


def test_pos_embed_resampling_non_square_source_and_errors():
    pe = torch.randn(1, 1 + 12, 8)
    out = resample_abs_pos_embed(pe, (6, 8), old_size=(3, 4))
    torch.testing.assert_close(out, timm_resample_pos(pe, [6, 8], old_size=[3, 4], antialias=False), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="not a square"):
        resample_abs_pos_embed(pe, (6, 8))


def test_patch_kernel_14_to_16_matches_timm_and_preserves_tokens():
    torch.manual_seed(0)
    w14 = torch.randn(4, 3, 14, 14)
    w16 = resample_patch_embed(w14, 16)
    assert w16.shape == (4, 3, 16, 16)
    torch.testing.assert_close(w16, timm_resample_patch(w14, [16, 16]), rtol=0, atol=1e-4)
    # a 14-px patch upsampled to 16 px gives the same token with the resampled kernel
    x = torch.randn(5, 3, 14, 14)
    x16 = F.interpolate(x, size=(16, 16), mode="bicubic", align_corners=False, antialias=True)
    torch.testing.assert_close(
        F.conv2d(x16, w16, stride=16), F.conv2d(x, w14, stride=14), rtol=1e-4, atol=1e-4
    )


def test_rel_pos_resampling():
    t = torch.randn(7, 16)
    assert resample_rel_pos(t, 7) is t
    out = resample_rel_pos(t, 13)
    assert out.shape == (13, 16)
    torch.testing.assert_close(resample_rel_pos(torch.ones(7, 2), 27), torch.ones(27, 2))
