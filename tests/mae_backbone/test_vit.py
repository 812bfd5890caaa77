"""The ViT: registry, equality with timm, dense-task options, hooks."""
from __future__ import annotations

import pytest
import timm
import torch

from mae_backbone import VIT_ARCHS, create_vit, list_models, resample_abs_pos_embed

TIMM_NAMES = {
    "vit_tiny_patch16": "vit_tiny_patch16_224",
    "vit_small_patch16": "vit_small_patch16_224",
    "vit_base_patch16": "vit_base_patch16_224",
    "vit_large_patch16": "vit_large_patch16_224",
    "vit_huge_patch14": "vit_huge_patch14_224",
}


def _randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-trivial weights everywhere (LayerNorm ones/zeros would hide layout mistakes)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def test_registry_lists_the_five_sizes():
    assert list_models() == list(TIMM_NAMES)
    assert VIT_ARCHS["vit_base_patch16"] == dict(embed_dim=768, depth=12, num_heads=12, patch_size=16)
    assert VIT_ARCHS["vit_huge_patch14"] == dict(embed_dim=1280, depth=32, num_heads=16, patch_size=14)


@pytest.mark.parametrize("name", list(TIMM_NAMES))
def test_full_size_state_dict_matches_timm(name):
    """Every registered size has exactly timm's keys and shapes (built on the meta device)."""
    with torch.device("meta"):
        ours = create_vit(name).state_dict()
        ref = timm.create_model(TIMM_NAMES[name], pretrained=False, num_classes=0).state_dict()
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in ref.items()}


@pytest.mark.parametrize("name", list(TIMM_NAMES))
def test_every_size_forward_backward_tiny(name):
    patch = VIT_ARCHS[name]["patch_size"]
    model = create_vit(name, depth=2, img_size=2 * patch, num_classes=5, drop_path_rate=0.1)
    x = torch.randn(2, 3, 2 * patch, 3 * patch)  # non-square: pos-embed resampled on the fly
    out = model(x)
    assert out.shape == (2, 5)
    out.square().sum().backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), n
    assert model.pos_embed.requires_grad is False  # MAE's fixed sin-cos table


@pytest.mark.parametrize("global_pool", [False, True])
def test_forward_equals_timm_for_same_weights(global_pool):
    torch.manual_seed(0)
    ours = create_vit("vit_tiny_patch16", num_classes=7, global_pool=global_pool).eval()
    _randomize(ours)
    ref = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=7, global_pool="avg" if global_pool else "token"
    ).eval()
    ref.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        feats = ours.forward_features(x)
        assert feats.shape == (2, 197, 192)
        torch.testing.assert_close(feats, ref.forward_features(x), rtol=0, atol=1e-5)
        torch.testing.assert_close(ours(x), ref(x), rtol=0, atol=1e-5)


def test_weights_load_into_timm_mae_model_without_conversion():
    ours = create_vit("vit_base_patch16")
    ref = timm.create_model("vit_base_patch16_224.mae", pretrained=False)
    ref.load_state_dict(ours.state_dict(), strict=True)


def test_window_covering_the_grid_equals_global_attention():
    torch.manual_seed(0)
    glob = create_vit("vit_tiny_patch16", depth=3, img_size=64, dense_cls=False).eval()
    _randomize(glob)
    win = create_vit("vit_tiny_patch16", depth=3, img_size=64, window_size=4, global_blocks=[1]).eval()
    win.load_state_dict(glob.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        a = glob.forward_intermediates(x, [0, 2])
        b = win.forward_intermediates(x, [0, 2])
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v, rtol=0, atol=1e-5)
    # a smaller window really restricts attention
    small = create_vit("vit_tiny_patch16", depth=3, img_size=64, window_size=2).eval()
    small.load_state_dict(glob.state_dict())
    with torch.no_grad():
        assert (small.forward_intermediates(x, [2])[0] - a[1]).abs().max() > 1e-3


def test_rel_pos_at_zero_init_changes_nothing_and_is_applied_when_nonzero():
    torch.manual_seed(0)
    plain = create_vit("vit_tiny_patch16", depth=2, img_size=64).eval()
    _randomize(plain)
    rel = create_vit("vit_tiny_patch16", depth=2, img_size=64, rel_pos=True).eval()
    missing = rel.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert sorted(missing) == sorted(f"blocks.{i}.attn.rel_pos_{a}" for i in range(2) for a in "hw")
    assert rel.blocks[0].attn.rel_pos_h.shape == (2 * 4 - 1, 64)
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        torch.testing.assert_close(
            rel.forward_intermediates(x, [1])[0], plain.forward_intermediates(x, [1])[0], rtol=0, atol=1e-6
        )
        rel.blocks[0].attn.rel_pos_w.normal_(0, 10.0)
        assert (rel.forward_intermediates(x, [1])[0] - plain.forward_intermediates(x, [1])[0]).abs().max() > 1e-3


def test_forward_intermediates_shapes_indices_and_output_shape():
    model = create_vit("vit_tiny_patch16", depth=4, img_size=64).eval()
    x = torch.randn(2, 3, 48, 80)
    outs = model.forward_intermediates(x, [1, -1, 0])
    assert [tuple(o.shape) for o in outs] == [(2, 192, 3, 5)] * 3
    assert [tuple(o.shape) for o in model.forward_intermediates(x, 2)] == [(2, 192, 3, 5)] * 2
    spec = model.output_shape([1, 3])
    assert list(spec) == ["blocks.1", "blocks.3"] and spec["blocks.1"].channels == 192 and spec["blocks.1"].stride == 16
    with pytest.raises(ValueError, match="out of range"):
        model.forward_intermediates(x, [4])
    with pytest.raises(ValueError, match="multiple of the patch size"):
        model.forward_intermediates(torch.randn(1, 3, 50, 64), [0])
    # the last map equals the tokens of forward_features (without norm) at the same input
    with torch.no_grad():
        seq = model.prepare_tokens(x)[0]
        for i in range(4):
            seq = model.blocks[i](seq, (3, 5), 1)
        torch.testing.assert_close(outs[1], seq[:, 1:].transpose(1, 2).reshape(2, 192, 3, 5))


def test_non_square_grid_uses_resampled_pos_embed():
    model = create_vit("vit_tiny_patch16", depth=1, img_size=64)
    pos = model.pos_embed_for((3, 7))
    torch.testing.assert_close(pos, resample_abs_pos_embed(model.pos_embed, (3, 7), old_size=(4, 4)))
    assert pos.shape == (1, 1 + 21, 192)


def test_grad_checkpointing_gives_identical_gradients():
    torch.manual_seed(0)
    a = create_vit("vit_tiny_patch16", depth=2, img_size=32, num_classes=3)
    b = create_vit("vit_tiny_patch16", depth=2, img_size=32, num_classes=3, grad_checkpointing=True)
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 3, 32, 32)
    a(x).sum().backward()
    b(x).sum().backward()
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        if p.requires_grad:
            torch.testing.assert_close(p.grad, q.grad, msg=n)


def test_in_chans_and_no_head():
    model = create_vit("vit_tiny_patch16", depth=1, img_size=32, in_chans=1)
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 192)
    assert model.patch_embed.proj.weight.shape == (192, 1, 16, 16)


def test_layer_id_and_no_weight_decay_hooks():
    model = create_vit("vit_tiny_patch16", depth=3, num_classes=4, global_pool=True)
    assert model.num_layers == 5
    assert model.layer_id("patch_embed.proj.weight") == 0
    assert model.layer_id("cls_token") == 0 and model.layer_id("pos_embed") == 0
    assert model.layer_id("blocks.0.attn.qkv.weight") == 1
    assert model.layer_id("blocks.2.mlp.fc2.bias") == 3
    assert model.layer_id("backbone.net.blocks.1.norm1.weight") == 2
    assert model.layer_id("fc_norm.weight") == 4 and model.layer_id("head.weight") == 4
    assert model.no_weight_decay() == {"pos_embed", "cls_token"}


def test_unknown_name_suggests_the_closest():
    with pytest.raises(KeyError, match="vit_base_patch16"):
        create_vit("vit_bse_patch16")
