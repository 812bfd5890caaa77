"""``MAEViT`` with real MMSeg: registry, shapes, necks, options, freezing, pretrained loading."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from mmengine.logging import MMLogger
from mmseg.models.necks import Feature2Pyramid, MultiLevelNeck
from mmseg.registry import MODELS

from mae_backbone import VIT_ARCHS, CheckpointError, UnsafeCheckpointError, create_vit, resample_abs_pos_embed
from mae_backbone.checkpoint import write_checkpoint
from segmentation import MAEViT

from unsafe_pickle import RunsCode

TINY = dict(embed_dim=64, depth=4, num_heads=2)


def tiny(**kw) -> MAEViT:
    kw.setdefault("arch", TINY)
    kw.setdefault("img_size", 64)
    kw.setdefault("out_indices", [0, 1, 2, 3])
    torch.manual_seed(0)
    return MAEViT(**kw)


# --------------------------------------------------------------------------- registry
def test_builds_from_a_config_that_only_imports_our_module(tmp_path):
    """A fresh interpreter: nothing imports `segmentation` but the config's custom_imports."""
    cfg = tmp_path / "user_config.py"
    cfg.write_text(textwrap.dedent("""
        custom_imports = dict(imports=['segmentation'], allow_failed_imports=False)
        default_scope = 'mmseg'
        model = dict(
            type='EncoderDecoder',
            backbone=dict(type='MAEViT', arch='base', img_size=64, out_indices=[3, 5, 7, 11]),
            neck=dict(type='Feature2Pyramid', embed_dim=768, rescales=[4, 2, 1, 0.5],
                      norm_cfg=dict(type='BN', requires_grad=True)),
            decode_head=dict(type='FCNHead', in_channels=768, in_index=3, channels=8, num_convs=1,
                             num_classes=3, loss_decode=dict(type='CrossEntropyLoss')))
    """))
    code = textwrap.dedent(f"""
        import sys, torch
        from mmengine.config import Config
        from mmengine.registry import init_default_scope
        from mmseg.registry import MODELS
        assert 'segmentation' not in sys.modules
        cfg = Config.fromfile({str(cfg)!r})
        init_default_scope(cfg.default_scope)
        model = MODELS.build(cfg.model).eval()
        with torch.no_grad():
            feats = model.extract_feat(torch.zeros(1, 3, 64, 96))
        print(type(model.backbone).__module__, type(model.backbone).__name__, model.backbone.vit.depth,
              [tuple(f.shape) for f in feats])
    """)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split("\n")[-2] == (
        "segmentation.backbone MAEViT 12 [(1, 768, 16, 24), (1, 768, 8, 12), (1, 768, 4, 6), (1, 768, 2, 3)]")


# --------------------------------------------------------------------------- shapes
@pytest.mark.parametrize("name", list(VIT_ARCHS))
def test_output_shapes_for_every_size_and_out_index(name):
    """Every registered width / heads / patch size (depth cut to 3), non-square input."""
    spec = dict(VIT_ARCHS[name], depth=3)
    p = spec["patch_size"]
    model = MAEViT(arch=spec, img_size=4 * p, out_indices=[0, 1, 2, -1]).eval()
    with torch.no_grad():
        outs = model(torch.randn(2, 3, 3 * p, 5 * p))
    assert [tuple(o.shape) for o in outs] == [(2, spec["embed_dim"], 3, 5)] * 4
    assert torch.equal(outs[2], outs[3])  # -1 is the last block
    assert not torch.allclose(outs[0], outs[1])
    assert model.output_channels() == [spec["embed_dim"]] * 4


def test_named_arch_and_bad_arguments():
    assert MAEViT(arch="small", img_size=32, out_indices=[11]).vit.embed_dim == 384
    with pytest.raises(KeyError, match="unknown arch 'bsae'"):
        MAEViT(arch="bsae")
    with pytest.raises(ValueError, match=r"block indices \[4\] out of range"):
        tiny(out_indices=[1, 4])
    with pytest.raises(ValueError, match="frozen_stages"):
        tiny(frozen_stages=5)


def test_inputs_are_padded_to_the_patch_size():
    model = tiny().eval()
    x = torch.randn(1, 3, 70, 90)
    with torch.no_grad():
        outs = model(x)
        padded = model(torch.nn.functional.pad(x, (0, 6, 0, 10)))
    assert tuple(outs[0].shape) == (1, 64, 5, 6)
    for a, b in zip(outs, padded):
        torch.testing.assert_close(a, b)


def test_feature2pyramid_and_multilevelneck_take_the_outputs():
    model = tiny().eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        feats = model(x)
        pyramid = Feature2Pyramid(64, rescales=[4, 2, 1, 0.5], norm_cfg=dict(type="BN")).eval()(feats)
        multi = MultiLevelNeck([64] * 4, 32, scales=[4, 2, 1, 0.5]).eval()(feats)
    expected = [(16, 24), (8, 12), (4, 6), (2, 3)]  # strides 4, 8, 16, 32
    assert [tuple(f.shape) for f in pyramid] == [(2, 64, h, w) for h, w in expected]
    assert [tuple(f.shape) for f in multi] == [(2, 32, h, w) for h, w in expected]


# --------------------------------------------------------------------------- options
def test_rel_pos_is_zero_init_windows_and_checkpointing_train():
    plain = tiny().eval()
    rel = tiny(use_rel_pos=True).eval()
    missing = rel.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert sorted(missing) == sorted(f"vit.blocks.{i}.attn.rel_pos_{a}" for i in range(4) for a in "hw")
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        for a, b in zip(plain(x), rel(x)):
            torch.testing.assert_close(a, b)  # zero-initialized bias: the same function

    kw = dict(use_rel_pos=True, window_size=2, global_blocks=[1, 3], drop_path_rate=0.0)
    ref, cp = tiny(**kw).train(), tiny(with_cp=True, **kw).train()
    cp.load_state_dict(ref.state_dict())
    assert ref.vit.blocks[0].window_size == 2 and ref.vit.blocks[1].window_size == 0
    for m in (ref, cp):
        sum(o.square().mean() for o in m(x)).backward()
    assert ref.vit.blocks[0].attn.rel_pos_h.grad.abs().sum() > 0
    for (name, a), b in zip(ref.named_parameters(), cp.parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=name)


def test_frozen_stages_stay_frozen():
    model = tiny(frozen_stages=2, drop_path_rate=0.5)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    expected = {n for n, _ in model.named_parameters()
                if n.startswith(("vit.patch_embed", "vit.cls_token", "vit.pos_embed", "vit.blocks.0.", "vit.blocks.1."))}
    assert frozen == expected
    model.train()
    assert [b.training for b in model.vit.blocks] == [False, False, True, True]
    assert not model.vit.patch_embed.training
    # in train mode, the frozen blocks run without drop path: deterministic
    x = torch.randn(2, 3, 64, 64)
    a, b = model(x)[1], model(x)[1]
    torch.testing.assert_close(a, b)
    assert not torch.allclose(model(x)[3], model(x)[3])  # the trainable ones keep it
    assert tiny(frozen_stages=-1).vit.pos_embed.requires_grad


# --------------------------------------------------------------------------- pretrained weights
@pytest.fixture
def mae_checkpoint(tmp_path):
    """An official-MAE-format file from a 32 px ViT (2x2 grid) with a classifier head."""
    torch.manual_seed(1)
    src = create_vit("vit_tiny_patch16", **TINY, img_size=32, num_classes=5)
    sd = src.state_dict()
    sd["decoder_embed.weight"] = torch.zeros(8, 64)  # MAE pretraining files carry the decoder
    path = write_checkpoint(sd, tmp_path / "mae_pretrain.pth", "mae")
    return path, src.state_dict()


def _capture_mmlogger() -> tuple[MMLogger, logging.Handler, list[str]]:
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logger = MMLogger.get_current_instance()
    logger.addHandler(handler)
    return logger, handler, records


@pytest.mark.parametrize("how", ["pretrained", "init_cfg"])
def test_pretrained_checkpoint_loads_with_the_expected_report(mae_checkpoint, how):
    path, src = mae_checkpoint
    arg = {"pretrained": str(path)} if how == "pretrained" else {"init_cfg": dict(type="Pretrained", checkpoint=str(path))}
    cfg = dict(type="EncoderDecoder",
               backbone=dict(type="MAEViT", arch=TINY, img_size=64, out_indices=[3], use_rel_pos=True, **arg),
               decode_head=dict(type="FCNHead", in_channels=64, channels=8, num_convs=1, num_classes=3,
                                loss_decode=dict(type="CrossEntropyLoss")))
    model = MODELS.build(cfg)
    logger, handler, records = _capture_mmlogger()
    try:
        model.init_weights()  # what the Runner does before training
    finally:
        logger.removeHandler(handler)
    report = model.backbone.load_report
    assert report.format == "mae"
    assert sorted(report.missing) == sorted(f"blocks.{i}.attn.rel_pos_{a}" for i in range(4) for a in "hw")
    assert sorted(report.unexpected) == ["head.bias", "head.weight", "norm.bias", "norm.weight"]
    assert list(report.resampled) == ["pos_embed"] and "(1, 5, 64) -> (1, 17, 64)" in report.resampled["pos_embed"]
    assert any("decoder" in n for n in report.notes)
    vit = model.backbone.vit
    torch.testing.assert_close(vit.blocks[2].mlp.fc1.weight, src["blocks.2.mlp.fc1.weight"])
    torch.testing.assert_close(vit.pos_embed, resample_abs_pos_embed(src["pos_embed"], (4, 4)))
    assert vit.blocks[0].attn.rel_pos_h.abs().sum() == 0
    assert any("MAEViT pretrained weights" in r and "resampled" in r for r in records)


def test_a_missing_block_key_is_an_error(mae_checkpoint, tmp_path):
    path, src = mae_checkpoint
    sd = dict(src)
    del sd["blocks.1.mlp.fc1.weight"]
    bad = write_checkpoint(sd, tmp_path / "broken.pth", "timm")
    with pytest.raises(CheckpointError, match=r"missing from the checkpoint: blocks\.1\.mlp\.fc1\.weight"):
        tiny(pretrained=str(bad)).init_weights()
    with pytest.raises(CheckpointError, match="missing from the checkpoint: norm.bias, norm.weight"):
        no_norm = {k: v for k, v in src.items() if not k.startswith("norm.")}
        tiny(pretrained=str(write_checkpoint(no_norm, tmp_path / "nonorm.pth", "timm")), norm_out=True).init_weights()


def test_a_malicious_pretrained_file_is_refused(tmp_path):
    torch.save({"model": RunsCode(tmp_path / "pwned")}, tmp_path / "evil.pth")
    with pytest.raises(UnsafeCheckpointError, match="refused to load"):
        tiny(init_cfg=dict(type="Pretrained", checkpoint=str(tmp_path / "evil.pth"))).init_weights()
    assert not (tmp_path / "pwned").exists()
