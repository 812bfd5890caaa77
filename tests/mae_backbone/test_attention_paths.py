"""Every relative-position attention path of the ViT computes the plain ViTDet formulation.

The reference is ``mae_transfer.speed.vitdet_reference.PlainViTDet``: the same parameters, the
logits as one tensor, the decomposed bias added by broadcasting, softmax, times ``v`` (itself
pinned to ``transformers.VitDetModel`` below). A tiny detection ViT (width 32, 2 heads, patch 8,
windows of 4 patches in blocks 0 and 2, global block 1 with tables made for a 6x6 grid), every
parameter random, on grids of 6x6, 5x5 and 6x5: windows padded (5 -> 8: partial windows of one
row / column), the global tables resampled (11 -> 9 rows). Compared: the last map, the gradients
of the input and of every parameter, and the parameters after one AdamW step; fp32 within 1e-5
of the largest value, bf16 (autocast) no further from the fp32 reference than the plain
formulation in bf16 is, with a margin.
"""
from __future__ import annotations

import copy

import pytest
import torch

import mae_backbone.layers as layers
from detection.backbone import prepare_vit
from mae_backbone import create_vit
from mae_backbone.layers import REL_POS_IMPLS, rel_pos_attention, set_rel_pos_impl
from mae_transfer.speed.vitdet_reference import PlainViTDet, hf_vitdet_backbone

SIZES = [(48, 48), (40, 40), (48, 40)]


def tiny_vit(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    vit = create_vit("vit_tiny_patch16", embed_dim=32, depth=3, num_heads=2, patch_size=8, img_size=48,
                     window_size=4, global_blocks=(1,), rel_pos=True, dense_cls=False, pos_embed_learnable=True)
    vit = prepare_vit(vit).train()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in vit.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1.0 + 0.3 * noise if "norm" in name and name.endswith("weight") else
                    (0.5 if "rel_pos" in name else 0.2) * noise)
    return vit


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    assert got.shape == want.shape
    return ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()


def run(model, vit, x, bf16: bool = False):
    """Last map, input gradient and parameter gradients of ``sum(map * weights)``."""
    vit.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = model(x)
    weights = torch.linspace(-1, 1, out.numel()).reshape(out.shape)
    (out.float() * weights).sum().backward()
    grads = {n: p.grad.clone() for n, p in vit.named_parameters() if p.grad is not None}
    return out.detach().float(), x.grad, grads


def ours(vit):
    return lambda x: vit.forward_intermediates(x, [vit.depth - 1])[0]


def assert_same_as_plain(vit, x) -> None:
    out, gx, grads = run(ours(vit), vit, x)
    ref_out, ref_gx, ref_grads = run(PlainViTDet(vit), vit, x)
    assert rel_err(out, ref_out) <= 1e-5
    assert rel_err(gx, ref_gx) <= 1e-5
    assert grads.keys() == ref_grads.keys() and any("rel_pos" in n for n in grads)
    for name in ref_grads:  # every weight, the relative tables and the qkv bias (padding keys) included
        assert rel_err(grads[name], ref_grads[name]) <= 1e-5, name


@pytest.mark.parametrize("impl", REL_POS_IMPLS)
@pytest.mark.parametrize("size", SIZES)
def test_every_path_gives_the_plain_formulation_in_fp32(impl, size):
    vit = tiny_vit()
    set_rel_pos_impl(vit, impl)
    assert_same_as_plain(vit, torch.randn(2, 3, *size))


@pytest.mark.parametrize("size", SIZES)
def test_recomputing_in_chunks_of_one_query_row_gives_the_plain_formulation(size, monkeypatch):
    monkeypatch.setattr(layers, "_chunk_rows", lambda *args: 1)
    vit = tiny_vit()
    set_rel_pos_impl(vit, "recompute")
    assert_same_as_plain(vit, torch.randn(2, 3, *size))


@pytest.mark.parametrize("impl", ["auto", "explicit", "recompute"])
def test_one_optimizer_step_lands_on_the_plain_formulations_weights(impl):
    """SGD with momentum and weight decay (Adam's first step is ``lr * sign(grad)``, which turns the
    rounding noise of analytically zero gradients, such as the key bias's, into full steps)."""
    vit = tiny_vit(seed=1)
    set_rel_pos_impl(vit, impl)
    ref = copy.deepcopy(vit)
    x = torch.randn(2, 3, 40, 48)
    models = ((ours(vit), vit), (PlainViTDet(ref), ref))
    for model, params in models:
        opt = torch.optim.SGD(params.parameters(), lr=0.5, momentum=0.9, weight_decay=0.05)
        model(x).square().mean().backward()
        opt.step()
    changed = False
    for (name, p), q in zip(vit.named_parameters(), ref.parameters()):
        assert rel_err(p, q) <= 1e-5, name
        changed |= not torch.equal(p, tiny_vit(seed=1).state_dict()[name])
    assert changed


@pytest.mark.parametrize("impl,row_chunks", [("auto", False), ("explicit", False), ("recompute", False),
                                             ("recompute", True)])
def test_bf16_paths_are_as_close_to_fp32_as_the_plain_formulation_in_bf16(impl, row_chunks, monkeypatch):
    if row_chunks:  # partial sums of the key / value gradients, accumulated in fp32
        monkeypatch.setattr(layers, "_chunk_rows", lambda *args: 1)
    vit = tiny_vit(seed=2)
    set_rel_pos_impl(vit, impl)
    x = torch.randn(2, 3, 40, 40)
    plain = PlainViTDet(vit)
    want = run(plain, vit, x)
    plain_bf16 = run(plain, vit, x, bf16=True)
    got = run(ours(vit), vit, x, bf16=True)
    pairs = [(got[0], plain_bf16[0], want[0]), (got[1], plain_bf16[1], want[1])]
    pairs += [(got[2][n], plain_bf16[2][n], want[2][n]) for n in want[2]]
    for ours_bf16, ref_bf16, ref in pairs:
        # bf16 has 8 bits of mantissa: ours may round in other places, not be worse than 2x + 1%
        assert rel_err(ours_bf16, ref) <= 2 * rel_err(ref_bf16, ref) + 1e-2


def _keeps_a_global_map(model, x, tokens: int) -> bool:
    """Whether autograd saves a [..., tokens, tokens] tensor (an attention map) during ``model(x)``."""
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    return any(shape[-2:] == (tokens, tokens) for shape in shapes)


def test_recomputing_paths_keep_no_global_attention_map(monkeypatch):
    """The global block's map (36 x 36 tokens) is kept by the plain formulation and the explicit
    path, not by the recomputing ones (under "auto" windows keep their 16 x 16 maps)."""
    vit = tiny_vit()
    x = torch.randn(2, 3, 48, 48)
    assert _keeps_a_global_map(PlainViTDet(vit), x, 36)
    set_rel_pos_impl(vit, "explicit")
    assert _keeps_a_global_map(ours(vit), x, 36)
    monkeypatch.setattr(layers, "RECOMPUTE_MIN_LOGITS", 1)  # "auto" decides by size: every map is "large"
    for impl in ("recompute", "auto"):
        set_rel_pos_impl(vit, impl)
        assert not _keeps_a_global_map(ours(vit), x, 36)
    assert _keeps_a_global_map(ours(vit), x, 16)  # "auto": the windows' maps


def test_auto_recomputes_large_maps_only(monkeypatch):
    q = torch.randn(1, 2, 64, 8, requires_grad=True)
    r = torch.randn(8, 8, 8)
    small = rel_pos_attention(q, q, q, r, r, 0.3, (8, 8), (8, 8), recompute=None)  # 8192 logits
    assert type(small.grad_fn).__name__ != "RecomputedRelPosAttentionBackward"
    monkeypatch.setattr(layers, "RECOMPUTE_MIN_LOGITS", 2 * 64 * 64)
    large = rel_pos_attention(q, q, q, r, r, 0.3, (8, 8), (8, 8), recompute=None)
    assert type(large.grad_fn).__name__ == "RecomputedRelPosAttentionBackward"
    torch.testing.assert_close(large, small)


def test_the_plain_reference_is_transformers_vitdet():
    """The reference itself equals ``transformers.VitDetBackbone`` with the same weights (fp32)."""
    vit = tiny_vit().eval()
    hf = hf_vitdet_backbone(vit, img_size=48).eval()
    for size in SIZES:
        x = torch.randn(1, 3, *size)
        with torch.no_grad():
            assert rel_err(PlainViTDet(vit)(x), hf(x).feature_maps[-1]) <= 1e-5
