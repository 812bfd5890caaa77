"""Masking kinds: exact kept counts, the specified block and grid layouts, noise determinism."""
from __future__ import annotations

import pytest
import torch

from pretrain.masking import block_mask, check_masking, grid_mask, mask_noise, num_keep

GRID = (14, 14)
CASES = [("random", r) for r in (0.25, 0.5, 0.75, 0.9)] + [("block", r) for r in (0.4, 0.5, 0.75)] + [("grid", 0.75)]


@pytest.mark.parametrize("kind,ratio", CASES)
def test_noise_keeps_exactly_len_keep_patches(kind, ratio):
    noise = mask_noise(kind, GRID, ratio, seeds=[1, 2, 3])
    L = GRID[0] * GRID[1]
    keep = num_keep(L, ratio)
    assert noise.shape == (3, L)
    ids = noise.argsort(dim=1)
    for row in ids:  # the shuffle is a permutation
        assert torch.equal(row.sort().values, torch.arange(L))
    if kind != "random":  # layout kinds separate kept (< 1) from masked (>= 1) exactly at len_keep
        assert ((noise < 1).sum(dim=1) == keep).all()


@pytest.mark.parametrize("kind,ratio", CASES)
def test_model_masks_have_exact_counts_and_shapes(tiny_mae, kind, ratio):
    model = tiny_mae(img_size=64, masking=kind)  # 8x8 grid
    imgs = torch.randn(3, 3, 64, 64)
    L = 64
    keep = num_keep(L, ratio)
    latent, mask, ids_restore = model.forward_encoder(imgs, ratio)
    assert latent.shape == (3, 1 + keep, 32)
    assert mask.shape == (3, L) and ids_restore.shape == (3, L)
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    assert (mask.sum(dim=1) == L - keep).all()
    loss, pred, mask2 = model(imgs, ratio)
    assert pred.shape == (3, L, 8 * 8 * 3) and loss.ndim == 0


def test_grid_layout_keeps_top_left_of_every_2x2():
    m = grid_mask((6, 8))
    for i in range(6):
        for j in range(8):
            assert bool(m[i, j]) == (not (i % 2 == 0 and j % 2 == 0))
    noise = mask_noise("grid", (6, 8), 0.75, batch=2)
    kept = noise.argsort(dim=1)[:, : num_keep(48, 0.75)]
    expected = torch.tensor([i * 8 + j for i in range(0, 6, 2) for j in range(0, 8, 2)])
    assert torch.equal(kept[0], expected) and torch.equal(kept[1], expected)


def test_grid_masking_rejects_other_ratios_and_odd_grids():
    with pytest.raises(ValueError, match="0.75"):
        check_masking("grid", 0.5, (14, 14))
    with pytest.raises(ValueError, match="even"):
        check_masking("grid", 0.75, (7, 7))


def _masked_neighbour_fraction(mask: torch.Tensor) -> float:
    """Among the 4-neighbours of masked patches, the fraction that are masked too."""
    m = mask.float()
    pad = torch.nn.functional.pad(m, (1, 1, 1, 1))
    valid = torch.nn.functional.pad(torch.ones_like(m), (1, 1, 1, 1))
    shifts = [(0, 1), (2, 1), (1, 0), (1, 2)]
    h, w = m.shape
    masked_nb = sum(pad[a : a + h, b : b + w] for a, b in shifts)
    total_nb = sum(valid[a : a + h, b : b + w] for a, b in shifts)
    return float((masked_nb * m).sum() / (total_nb * m).sum())


def test_block_masks_are_contiguous_blocks_unlike_random():
    block, rand = [], []
    for seed in range(30):
        g = torch.Generator().manual_seed(seed)
        bm = block_mask(GRID, 98, g)
        assert int(bm.sum()) == 98
        block.append(_masked_neighbour_fraction(bm))
        rm = mask_noise("random", GRID, 0.5, seeds=[seed]).argsort(1).argsort(1).reshape(GRID) >= 98
        rand.append(_masked_neighbour_fraction(rm))
    assert sum(block) / 30 > 0.75
    assert sum(rand) / 30 < 0.6


def test_per_sample_noise_depends_only_on_its_seed():
    for kind in ("random", "block"):
        a = mask_noise(kind, GRID, 0.75, seeds=[5, 9])
        b = mask_noise(kind, GRID, 0.75, seeds=[7, 9])
        assert torch.equal(a[1], b[1])
        assert not torch.equal(a[0], b[0])


def test_noise_makes_forward_deterministic(tiny_mae):
    model = tiny_mae().eval()
    imgs = torch.randn(2, 3, 32, 32)
    noise = torch.rand(2, 16)
    l1, p1, m1 = model(imgs, 0.75, noise=noise)
    l2, p2, m2 = model(imgs, 0.75, noise=noise)
    assert torch.equal(l1, l2) and torch.equal(p1, p2) and torch.equal(m1, m2)
    # official semantics: kept = the len_keep smallest noise values; mask 1 = removed
    keep = num_keep(16, 0.75)
    expected = torch.ones(2, 16)
    expected.scatter_(1, noise.argsort(dim=1)[:, :keep], 0.0)
    assert torch.equal(m1, expected)
    _, _, m3 = model(imgs, 0.75, noise=torch.rand(2, 16))
    assert not torch.equal(m1, m3)
