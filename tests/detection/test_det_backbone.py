"""The two pyramids: feature names, shapes and strides, padding, window == global, gradients."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from detectron2.modeling.backbone.fpn import FPN, LastLevelMaxPool
from detectron2.structures import ImageList

from detection import LayerNorm2d, SimpleFeaturePyramid, ViTMultiScale, evenly_spaced_blocks
from mae_backbone import create_vit


def tiny_vit(**overrides):
    kw = dict(depth=2, img_size=64, window_size=2, global_blocks=(1,), rel_pos=True, pos_embed_learnable=True)
    kw.update(overrides)
    return create_vit("vit_tiny_patch16", **kw)


def simple_pyramid(square_pad: int = 0, **vit) -> SimpleFeaturePyramid:
    return SimpleFeaturePyramid(tiny_vit(**vit), top_block=LastLevelMaxPool(), square_pad=square_pad)


def fpn_variant(square_pad: int = 0) -> FPN:
    bottom_up = ViTMultiScale(tiny_vit(depth=4, global_blocks=(3,)), square_pad=square_pad)
    return FPN(bottom_up, in_features=["res2", "res3", "res4", "res5"], out_channels=256, norm=LayerNorm2d,
               top_block=LastLevelMaxPool())


def _check(out: dict, spec: dict, names: list[str], channels: int, hw: tuple[int, int], batch: int) -> None:
    assert list(out) == names == list(spec)
    for name in names:
        stride = spec[name].stride
        assert spec[name].channels == channels
        assert out[name].shape == (batch, channels, math.ceil(hw[0] / stride), math.ceil(hw[1] / stride)), name


@pytest.mark.parametrize("hw, square_pad", [((64, 64), 64), ((64, 128), 0), ((96, 64), 128), ((64, 96), 0)])
def test_simple_pyramid_feature_names_shapes_and_strides(hw, square_pad):
    backbone = simple_pyramid(square_pad).eval()
    with torch.no_grad():
        out = backbone(torch.randn(2, 3, *hw))
    spec = backbone.output_shape()
    assert {k: s.stride for k, s in spec.items()} == {"p2": 4, "p3": 8, "p4": 16, "p5": 32, "p6": 64}
    _check(out, spec, ["p2", "p3", "p4", "p5", "p6"], 256, hw, 2)


def test_patch_8_vit_reaches_the_same_levels_with_scale_factors_2_to_quarter():
    vit = create_vit("vit_tiny_patch16", depth=2, img_size=64, patch_size=8, pos_embed_learnable=True, dense_cls=False)
    backbone = SimpleFeaturePyramid(vit, scale_factors=(2.0, 1.0, 0.5, 0.25), top_block=LastLevelMaxPool()).eval()
    with torch.no_grad():
        out = backbone(torch.randn(1, 3, 64, 96))
    spec = backbone.output_shape()
    assert {k: s.stride for k, s in spec.items()} == {"p2": 4, "p3": 8, "p4": 16, "p5": 32, "p6": 64}
    _check(out, spec, ["p2", "p3", "p4", "p5", "p6"], 256, (64, 96), 1)


@pytest.mark.parametrize("hw, square_pad", [((64, 64), 0), ((64, 128), 128)])
def test_fpn_variant_feature_names_shapes_and_strides(hw, square_pad):
    backbone = fpn_variant(square_pad).eval()
    x = torch.randn(1, 3, *hw)
    with torch.no_grad():
        bottom = backbone.bottom_up(x)
        out = backbone(x)
    spec = backbone.bottom_up.output_shape()
    assert {k: s.stride for k, s in spec.items()} == {"res2": 4, "res3": 8, "res4": 16, "res5": 32}
    _check(bottom, spec, ["res2", "res3", "res4", "res5"], 192, hw, 1)
    _check(out, backbone.output_shape(), ["p2", "p3", "p4", "p5", "p6"], 256, hw, 1)
    assert backbone.bottom_up.out_blocks == [0, 1, 2, 3]


def test_evenly_spaced_blocks_are_vitdets_global_blocks():
    assert evenly_spaced_blocks(12) == [2, 5, 8, 11]
    assert evenly_spaced_blocks(24) == [5, 11, 17, 23]
    assert evenly_spaced_blocks(32) == [7, 15, 23, 31]


def test_size_divisibility_and_padding_constraints():
    sfp = simple_pyramid(square_pad=1024)
    assert sfp.size_divisibility == 32
    assert sfp.padding_constraints == {"size_divisibility": 32, "square_size": 1024}
    fpn = fpn_variant(square_pad=1024)
    assert fpn.bottom_up.size_divisibility == 32 and fpn.size_divisibility == 32
    assert fpn.bottom_up.padding_constraints["square_size"] == 1024


def test_square_padding_in_the_backbone_equals_padding_the_image_first():
    """What Detectron2 >= 0.7 does with ``square_size`` (pad the batch to a square), the backbone
    does itself on 0.6: same features on the image's extent."""
    torch.manual_seed(0)
    backbone = simple_pyramid(square_pad=96).eval()
    image = torch.randn(3, 50, 70)
    batch = ImageList.from_tensors([image], backbone.size_divisibility)  # what 0.6 gives: 64 x 96
    assert tuple(batch.tensor.shape[-2:]) == (64, 96)
    square = F.pad(batch.tensor, (0, 0, 0, 32))  # 96 x 96, as ImageList pads a square
    with torch.no_grad():
        ours = backbone(batch.tensor)
        theirs = backbone(square)
    for name, feat in ours.items():
        h, w = feat.shape[-2:]
        torch.testing.assert_close(feat, theirs[name][..., :h, :w])
    assert theirs["p2"].shape[-2:] == (24, 24) and ours["p2"].shape[-2:] == (16, 24)


def test_window_covering_the_whole_grid_equals_global_attention():
    torch.manual_seed(0)
    windowed = simple_pyramid(window_size=4, global_blocks=()).eval()  # 64 px: a 4x4 grid, one window
    global_ = simple_pyramid(window_size=0, global_blocks=()).eval()
    with torch.no_grad():
        for name, p in windowed.named_parameters():
            if "rel_pos" in name:  # non-zero biases, so the test sees the relative positions
                p.normal_(std=0.5)
    global_.load_state_dict(windowed.state_dict())
    assert windowed.net.blocks[0].window_size == 4 and global_.net.blocks[0].window_size == 0
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        a, b = windowed(x), global_(x)
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-5, rtol=1e-4)


def test_every_trainable_parameter_gets_a_gradient():
    """DDP runs with find_unused_parameters=False: no parameter may be left out of the graph."""
    for backbone in (simple_pyramid(drop_path_rate=0.1, grad_checkpointing=True), fpn_variant()):
        backbone.train()
        out = backbone(torch.randn(1, 3, 64, 64))
        sum(o.float().mean() for o in out.values()).backward()
        missing = [n for n, p in backbone.named_parameters() if p.requires_grad and p.grad is None]
        assert not missing


def test_the_vit_inside_is_vitdets_dense_vit():
    backbone = simple_pyramid()
    keys = set(backbone.state_dict())
    assert not any(k.startswith(("net.cls_token", "net.norm.", "net.head", "net.fc_norm")) for k in keys)
    assert backbone.state_dict()["net.pos_embed"].shape == (1, 1 + 16, 192)  # the class slot stays
    assert {"simfp_2.0.weight", "simfp_2.4.weight", "simfp_2.4.norm.weight", "simfp_5.2.norm.bias"} <= keys


def test_patch_14_needs_resampling_to_16_for_the_pyramid():
    with pytest.raises(ValueError, match="patch_size=16"):
        SimpleFeaturePyramid(create_vit("vit_tiny_patch16", patch_size=14, depth=1, img_size=56))
