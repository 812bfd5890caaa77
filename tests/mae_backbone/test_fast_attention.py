"""Relative-position attention folded into queries/keys ("fused") equals the additive-mask path."""
from __future__ import annotations

import pytest
import torch

from mae_backbone import create_vit
from mae_backbone.layers import Attention, set_rel_pos_impl


def _close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-5) -> None:
    """Max deviation within ``rel`` of the reference's largest magnitude (fp32 rounding of sums)."""
    assert a.shape == b.shape
    err, scale = (a.float() - b.float()).abs().max().item(), b.float().abs().max().item()
    assert err <= rel * scale, f"max deviation {err:.3g} > {rel} x {scale:.3g}"


def _attention(rel_pos_size: int, seed: int = 0) -> Attention:
    torch.manual_seed(seed)
    attn = Attention(32, 4, rel_pos_size=rel_pos_size)
    torch.nn.init.normal_(attn.rel_pos_h, std=0.5)  # non-zero tables: the bias matters
    torch.nn.init.normal_(attn.rel_pos_w, std=0.5)
    return attn


def _run(attn: Attention, impl: str, x: torch.Tensor, hw, prefix: int):
    attn.rel_pos_impl = impl
    attn.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    y = attn(x, hw, prefix)
    (y * torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum().backward()
    return y.detach(), x.grad, {n: p.grad.clone() for n, p in attn.named_parameters()}


@pytest.mark.parametrize("hw,prefix,rel_size", [((4, 4), 0, 4), ((3, 5), 1, 5), ((6, 4), 1, 4), ((2, 2), 2, 7)])
def test_fused_rel_pos_attention_equals_the_mask_path(hw, prefix, rel_size):
    attn = _attention(rel_size)
    x = torch.randn(2, prefix + hw[0] * hw[1], 32)
    y_mask, gx_mask, g_mask = _run(attn, "mask", x, hw, prefix)
    y_fused, gx_fused, g_fused = _run(attn, "fused", x, hw, prefix)
    _close(y_fused, y_mask)
    _close(gx_fused, gx_mask)
    for name in g_mask:  # including the relative tables
        _close(g_fused[name], g_mask[name])
    assert g_mask["rel_pos_h"].abs().sum() > 0


def test_fused_rel_pos_vit_windows_and_global_blocks_match_in_fp32_and_bf16():
    torch.manual_seed(0)
    net = create_vit("vit_tiny_patch16", img_size=48, patch_size=8, depth=3, embed_dim=32, num_heads=2,
                     window_size=4, global_blocks=(1,), rel_pos=True, dense_cls=False).eval()
    for name, p in net.named_parameters():
        if "rel_pos" in name:
            torch.nn.init.normal_(p, std=0.5)
    x = torch.randn(2, 3, 48, 48)  # 6x6 grid: windows of 4 with padding, one global block
    outs = {}
    for impl in ("mask", "fused"):
        set_rel_pos_impl(net, impl)
        with torch.no_grad():
            outs[impl, "fp32"] = net.forward_intermediates(x, [0, 1, 2])
            with torch.autocast("cpu", dtype=torch.bfloat16):
                outs[impl, "bf16"] = net.forward_intermediates(x, [0, 1, 2])
    for a, b in zip(outs["fused", "fp32"], outs["mask", "fp32"]):
        _close(a, b)
    for a, b, ref in zip(outs["fused", "bf16"], outs["mask", "bf16"], outs["mask", "fp32"]):
        _close(a, b, rel=3e-2)  # bf16: 8 bits of mantissa, rounded in different places
        _close(a, ref, rel=3e-2)


def test_set_rel_pos_impl_names_the_choices():
    net = create_vit("vit_tiny_patch16", img_size=32, depth=1, rel_pos=True)
    assert net.blocks[0].attn.rel_pos_impl == "auto"  # the default
    with pytest.raises(ValueError, match="'auto', 'explicit', 'recompute', 'fused', 'mask'"):
        set_rel_pos_impl(net, "flash")
    set_rel_pos_impl(net, "mask")
    assert net.blocks[0].attn.rel_pos_impl == "mask"


def test_explicit_short_sequence_attention_equals_the_fused_kernel():
    from mae_backbone.layers import explicit_attention

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 17, 8, requires_grad=True) for _ in range(3))
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    out = explicit_attention(q, k, v, 8**-0.5)
    _close(out, ref)
    g_ref = torch.autograd.grad(ref.square().sum(), (q, k, v))
    g_out = torch.autograd.grad(out.square().sum(), (q, k, v))
    for a, b in zip(g_out, g_ref):
        _close(a, b)


def test_bf16_attention_block_on_short_sequences_is_the_fp32_one_within_bf16_precision():
    torch.manual_seed(0)
    attn = Attention(32, 4)
    x = torch.randn(2, 50, 32)
    ref = attn(x, (7, 7), 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attn(x, (7, 7), 1)  # 50 tokens: the explicit path
    _close(out, ref, rel=3e-2)


def test_intermediate_maps_are_contiguous_nchw():
    net = create_vit("vit_tiny_patch16", img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2)
    for y in net.forward_intermediates(torch.randn(2, 3, 32, 32), [0, 1]):
        assert y.shape == (2, 32, 4, 4) and y.is_contiguous()  # not a channels-last view of the tokens


@pytest.mark.parametrize("impl", ["auto", "explicit", "recompute", "fused", "mask"])
@pytest.mark.parametrize("hw,prefix", [((4, 4), 0), ((3, 3), 1)])  # tables of the grid's size: no resampling
def test_rel_pos_attention_follows_vitdet_bias_from_the_unscaled_query(impl, hw, prefix):
    """ViTDet: logits[i, j] = scale * q_i . k_j + q_i . Rh[row(i) - row(j)] + q_i . Rw[col(i) - col(j)],
    with the *unscaled* query in the bias terms (Detectron2's Attention passes q, not q * scale, to
    add_decomposed_rel_pos).  Written here with explicit offsets, independent of the model's einsums;
    random (non-zero) tables, so a scaled-query bias would be ~1/sqrt(head_dim) off."""
    torch.manual_seed(0)
    h, w = hw
    dim, heads = 32, 2
    attn = Attention(dim, heads, rel_pos_size=max(h, w)).eval()
    with torch.no_grad():
        attn.rel_pos_h.normal_(std=0.5)
        attn.rel_pos_w.normal_(std=0.5)
    set_rel_pos_impl(attn, impl)
    x = torch.randn(2, prefix + h * w, dim)
    with torch.no_grad():
        got = attn(x, hw, num_prefix=prefix)
        hd = dim // heads
        q, k, v = attn.qkv(x).reshape(2, -1, 3, heads, hd).permute(2, 0, 3, 1, 4).unbind(0)
        logits = (q * hd ** -0.5) @ k.transpose(-2, -1)
        size = max(h, w)  # tables of length 2 * size - 1; offset d sits at index d + size - 1
        for i in range(h * w):
            for j in range(h * w):
                dr, dc = i // w - j // w, i % w - j % w
                qi = q[:, :, prefix + i]
                logits[:, :, prefix + i, prefix + j] += (qi * attn.rel_pos_h[dr + size - 1]).sum(-1)
                logits[:, :, prefix + i, prefix + j] += (qi * attn.rel_pos_w[dc + size - 1]).sum(-1)
        ref = attn.proj((logits.softmax(-1) @ v).transpose(1, 2).reshape(2, -1, dim))
    _close(got, ref, rel=1e-5)
