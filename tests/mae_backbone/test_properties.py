"""Property-based tests (hypothesis) for the pure functions of mae_backbone."""
from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mae_backbone import resample_abs_pos_embed, resample_rel_pos, sincos_2d_pos_embed
from mae_backbone.formats import READERS, WRITERS

grids = st.tuples(st.integers(1, 9), st.integers(1, 9))


@settings(max_examples=40, deadline=None)
@given(grid=grids, dim=st.sampled_from([4, 8, 16]), prefix=st.integers(0, 2))
def test_pos_embed_resampling_is_identity_at_the_same_size(grid, dim, prefix):
    pe = torch.randn(1, prefix + grid[0] * grid[1], dim)
    assert torch.equal(resample_abs_pos_embed(pe, grid, old_size=grid, num_prefix_tokens=prefix), pe)


@settings(max_examples=40, deadline=None)
@given(old=grids, new=grids, prefix=st.integers(0, 2))
def test_pos_embed_resampling_keeps_prefix_and_constant_maps(old, new, prefix):
    pe = torch.full((1, prefix + old[0] * old[1], 4), 0.5)
    pe[:, :prefix] = torch.arange(prefix, dtype=torch.float32).view(1, -1, 1)
    out = resample_abs_pos_embed(pe, new, old_size=old, num_prefix_tokens=prefix)
    assert out.shape == (1, prefix + new[0] * new[1], 4)
    assert torch.equal(out[:, :prefix], pe[:, :prefix])
    torch.testing.assert_close(out[:, prefix:], torch.full_like(out[:, prefix:], 0.5), rtol=0, atol=1e-5)


@settings(max_examples=30, deadline=None)
@given(length=st.integers(1, 40), new=st.integers(1, 40))
def test_rel_pos_resampling_shape_and_identity(length, new):
    t = torch.randn(length, 3)
    assert resample_rel_pos(t, length) is t
    assert resample_rel_pos(t, new).shape == (new, 3)


@settings(max_examples=25, deadline=None)
@given(grid=grids)
def test_sincos_rows_are_distinct_and_bounded(grid):
    table = sincos_2d_pos_embed(16, grid)
    assert table.abs().max() <= 1.0
    assert torch.unique(table, dim=0).shape[0] == grid[0] * grid[1]


def _state_dict(depth: int, dim: int, with_head: bool) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(depth * 100 + dim)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    sd = {"cls_token": r(1, 1, dim), "pos_embed": r(1, 5, dim), "patch_embed.proj.weight": r(dim, 3, 4, 4),
          "patch_embed.proj.bias": r(dim), "norm.weight": r(dim), "norm.bias": r(dim)}
    for i in range(depth):
        p = f"blocks.{i}."
        sd.update({p + "norm1.weight": r(dim), p + "norm1.bias": r(dim), p + "attn.qkv.weight": r(3 * dim, dim),
                   p + "attn.qkv.bias": r(3 * dim), p + "attn.proj.weight": r(dim, dim), p + "attn.proj.bias": r(dim),
                   p + "norm2.weight": r(dim), p + "norm2.bias": r(dim), p + "mlp.fc1.weight": r(4 * dim, dim),
                   p + "mlp.fc1.bias": r(4 * dim), p + "mlp.fc2.weight": r(dim, 4 * dim), p + "mlp.fc2.bias": r(dim)})
    if with_head:
        sd.update({"head.weight": r(7, dim), "head.bias": r(7)})
    return sd


@settings(max_examples=30, deadline=None)
@given(fmt=st.sampled_from(sorted(WRITERS)), depth=st.integers(1, 3), dim=st.sampled_from([4, 8]),
       with_head=st.booleans())
def test_every_converter_round_trips_in_memory(fmt, depth, dim, with_head):
    sd = _state_dict(depth, dim, with_head)
    meta = {"embed_dim": dim, "depth": depth, "num_heads": 1, "patch_size": 4, "img_size": [8, 8]}
    back = READERS[fmt](WRITERS[fmt](sd, meta), [])
    dropped = {"detectron2": ("cls_token", "norm.", "head."), "mocov3": ("head.",), "mmseg": ("head.",),
               "mmseg-mae": ("head.",), "hf-vitdet": ("cls_token", "norm.", "head.")}.get(fmt, ())
    assert set(back) == {k for k in sd if not k.startswith(dropped)}
    assert all(torch.equal(back[k], sd[k]) for k in back)
