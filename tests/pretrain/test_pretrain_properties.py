"""Property-based tests (hypothesis) for the pure functions of pretraining: masking (kept count,
uniqueness, restore is the inverse of the shuffle), patchify / unpatchify."""
from __future__ import annotations

import functools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pretrain import create_mae
from pretrain.masking import mask_noise, num_keep


@functools.lru_cache(maxsize=None)
def tiny_mae(patch: int, grid: tuple[int, int] = (2, 2)):
    """A 1-block MAE with ``patch``-px patches (its own grid matters only for defaults)."""
    torch.manual_seed(0)
    return create_mae("mae_vit_tiny_patch16", img_size=(grid[0] * patch, grid[1] * patch), patch_size=patch,
                      depth=1, embed_dim=8, num_heads=1, decoder_embed_dim=8, decoder_depth=1, decoder_num_heads=1)


ratios = st.sampled_from([0.1, 0.25, 0.5, 0.6, 0.75, 0.9])


@st.composite
def masking_cases(draw):
    kind = draw(st.sampled_from(["random", "block", "grid"]))
    if kind == "grid":
        grid, ratio = (2 * draw(st.integers(1, 5)), 2 * draw(st.integers(1, 5))), 0.75
    else:
        grid, ratio = (draw(st.integers(1, 8)), draw(st.integers(1, 8))), draw(ratios)
    if num_keep(grid[0] * grid[1], ratio) < 1:
        grid = (grid[0] + 4, grid[1] + 4)
    seeds = draw(st.lists(st.integers(0, 2**62), min_size=1, max_size=4))
    return kind, grid, ratio, seeds


@settings(max_examples=60, deadline=None)
@given(case=masking_cases(), dim=st.integers(1, 5))
def test_masking_keeps_the_right_count_of_distinct_patches_and_restore_inverts_the_shuffle(case, dim):
    kind, grid, ratio, seeds = case
    n, num = len(seeds), grid[0] * grid[1]
    keep = num_keep(num, ratio)
    noise = mask_noise(kind, grid, ratio, seeds=seeds)
    assert noise.shape == (n, num)
    assert torch.equal(noise, mask_noise(kind, grid, ratio, seeds=seeds))  # a pure function of the seeds
    x = torch.randn(n, num, dim)
    x_kept, mask, ids_restore, ids_keep = tiny_mae(2).random_masking(x, ratio, noise)
    assert x_kept.shape == (n, keep, dim) and ids_keep.shape == (n, keep)
    # kept count, uniqueness, and the mask agrees with what was kept
    assert torch.equal(mask.sum(1), torch.full((n,), float(num - keep)))
    for i in range(n):
        assert len(set(ids_keep[i].tolist())) == keep
        assert sorted(ids_restore[i].tolist()) == list(range(num))  # a permutation
        assert (mask[i, ids_keep[i]] == 0).all()
        assert torch.equal(x_kept[i], x[i, ids_keep[i]])
    # restore inverts the shuffle: what the decoder does with the kept tokens + mask tokens
    token = torch.full((1, 1, dim), 123.0)
    shuffled = torch.cat([x_kept, token.expand(n, num - keep, dim)], dim=1)
    restored = torch.gather(shuffled, 1, ids_restore.unsqueeze(-1).expand(-1, -1, dim))
    visible = (mask == 0).unsqueeze(-1)
    assert torch.equal(torch.where(visible, restored, x), x)
    assert (restored[~visible.squeeze(-1)] == 123.0).all()


@settings(max_examples=40, deadline=None)
@given(patch=st.sampled_from([1, 2, 4]), grid=st.tuples(st.integers(1, 5), st.integers(1, 5)),
       n=st.integers(1, 3), chans=st.sampled_from([1, 3]))
def test_patchify_and_unpatchify_are_inverse_and_patches_are_the_image_tiles(patch, grid, n, chans):
    model = tiny_mae(patch)
    imgs = torch.randn(n, chans, grid[0] * patch, grid[1] * patch)
    x = model.patchify(imgs)
    assert x.shape == (n, grid[0] * grid[1], patch * patch * chans)
    assert torch.equal(model.unpatchify(x, grid), imgs)
    i, j = grid[0] - 1, grid[1] // 2
    tile = imgs[:, :, i * patch:(i + 1) * patch, j * patch:(j + 1) * patch]
    assert torch.equal(x[:, i * grid[1] + j], tile.permute(0, 2, 3, 1).reshape(n, -1))  # (p, q, c) order
