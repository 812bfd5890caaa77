"""Whole-segmentor checkpoints load strictly: a tensor that does not fit is an error naming it.

MMEngine's Runner and MMSeg's ``init_model`` load with ``strict=False``: before
``segmentation.checkpoint``, ``segment test`` with another model's checkpoint logged a warning,
skipped the tensors and printed the mIoU of random heads.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from mmengine.registry import init_default_scope
from mmseg.registry import MODELS

from mae_backbone import CheckpointError, resample_abs_pos_embed
from mae_backbone.io import add_checksum
from mae_transfer.cli import main
from segmentation import load_config, load_segmentor_state
from segmentation.engine import infer

from seg_helpers import TINY_VIT, unique_name


def build(config: Path, *options: str) -> torch.nn.Module:
    init_default_scope("mmseg")
    torch.manual_seed(0)
    return MODELS.build(load_config(config, list(options)).model)


def state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def save(sd: dict[str, torch.Tensor], path: Path, checksum: bool = False) -> Path:
    obj = {"state_dict": sd, "meta": {"dataset_meta": {"classes": ("a", "b", "c"), "palette": [[0, 0, 0]] * 3}}}
    torch.save(add_checksum(obj) if checksum else obj, path)
    return path


def _wrong_head(sd):
    sd["decode_head.conv_seg.weight"] = torch.zeros(5, *sd["decode_head.conv_seg.weight"].shape[1:])


def _no_neck(sd):
    for k in [k for k in sd if k.startswith("neck.")]:
        del sd[k]


def _extra(sd):
    sd["decode_head.extra.weight"] = torch.zeros(3)


def _wrong_block(sd):
    sd["backbone.vit.blocks.1.mlp.fc1.weight"] = torch.zeros(8, TINY_VIT["embed_dim"])


def _no_table(sd):
    del sd["backbone.vit.blocks.0.attn.relative_position_bias_table"]


@pytest.mark.parametrize("change, named", [
    (_wrong_head, "decode_head.conv_seg.weight: checkpoint (5, 32, 1, 1), model (3, 32, 1, 1)"),
    (_no_neck, "missing from the checkpoint: neck."),
    (_extra, "in the checkpoint but not in the model: decode_head.extra.weight"),
    (_wrong_block, "backbone.vit.blocks.1.mlp.fc1.weight: checkpoint (8, 64), model (256, 64)"),
    (_no_table, "missing from the checkpoint: backbone.vit.blocks.0.attn.relative_position_bias_table"),
], ids=lambda v: getattr(v, "__name__", "")[1:] if callable(v) else "")
def test_a_checkpoint_that_does_not_fit_is_refused_naming_the_keys(tiny_config, change, named):
    sd = state(build(tiny_config))
    change(sd)
    target = build(tiny_config, "randomness.seed=1")
    target.decode_head.conv_seg.weight.data.normal_()
    before = state(target)
    with pytest.raises(CheckpointError, match=re.escape(named)) as err:
        load_segmentor_state(target, {"state_dict": sd}, "bad.pth")
    assert str(err.value).startswith("bad.pth: ")
    for k, v in target.state_dict().items():  # refused before any weight changed
        assert torch.equal(before[k], v), k


def test_grid_sized_vit_tensors_are_resampled_and_reported(tiny_config):
    """A model trained at 32 px (2 x 2 grid) loads into the 64 px config (4 x 4): the position table
    and the BEiT tables are resampled and named in the report; everything else is equal."""
    src = build(tiny_config, "model.backbone.img_size=32")
    for p in src.parameters():
        p.data.normal_()
    sd = {"module." + k: v for k, v in state(src).items()}  # a DDP-wrapped model's names
    model = build(tiny_config)
    report = load_segmentor_state(model, {"state_dict": sd}, "small.pth")
    assert sorted(report.resampled) == sorted(["backbone.vit.pos_embed"] + [
        f"backbone.vit.blocks.{i}.attn.relative_position_bias_table" for i in range(TINY_VIT["depth"])])
    got = model.state_dict()
    torch.testing.assert_close(got["backbone.vit.pos_embed"],
                               resample_abs_pos_embed(src.backbone.vit.pos_embed.detach(), (4, 4), old_size=(2, 2)))
    for k, v in src.state_dict().items():
        if k not in report.resampled:
            assert torch.equal(got[k], v), k
    with pytest.raises(CheckpointError, match=r"backbone\.vit\.pos_embed: checkpoint \(1, 5, 64\), model \(1, 17, 64\)"):
        load_segmentor_state(model, {"state_dict": sd}, "small.pth", resample=False)  # a resume must fit


# --------------------------------------------------------------------------- through the CLI / engine
def test_segment_test_refuses_a_checkpoint_that_does_not_fit(tiny_config, tmp_path, capsys):
    sd = state(build(tiny_config))
    _wrong_head(sd)
    ckpt = save(sd, tmp_path / "other_classes.pth", checksum=True)
    before = ckpt.read_bytes()
    rc = main(["segment", "test", str(tiny_config), str(ckpt), "--work-dir", str(tmp_path / "work"),
               "--cfg-options", f"experiment_name={unique_name()}"])
    out, err = capsys.readouterr()
    assert rc == 2
    assert "other_classes.pth: does not fit this EncoderDecoder" in err and "decode_head.conv_seg.weight" in err
    assert "mIoU: " not in out and "aAcc" not in out  # no scores printed
    assert "Traceback" not in out + err and ckpt.read_bytes() == before


def test_segment_test_reports_what_it_resampled(tiny_config, tmp_path):
    from segmentation.engine import prepare, test

    ckpt = save(state(build(tiny_config, "model.backbone.img_size=32")), tmp_path / "trained_at_32.pth")
    cfg = prepare(load_config(tiny_config, [f"experiment_name={unique_name()}"]), work_dir=str(tmp_path / "work"))
    result = test(cfg, str(ckpt))
    assert "mIoU" in result.metrics
    assert "backbone.vit.pos_embed" in result.checkpoint.resampled
    assert "(1, 5, 64) -> (1, 17, 64)" in str(result.checkpoint)


def test_train_load_from_that_does_not_fit_stops_before_training(tiny_config, tmp_path, capsys):
    sd = state(build(tiny_config))
    _no_neck(sd)
    ckpt = save(sd, tmp_path / "no_neck.pth")
    work = tmp_path / "work"
    rc = main(["segment", "train", str(tiny_config), "--work-dir", str(work),
               "--cfg-options", f"load_from={ckpt}", f"experiment_name={unique_name()}"])
    err = capsys.readouterr().err
    assert rc == 2 and "no_neck.pth: does not fit" in err
    assert "missing from the checkpoint: neck." in err
    assert not list(work.glob("iter_*.pth"))


def test_infer_loads_strictly_and_verifies_the_checksum(tiny_config, ade_root, tmp_path):
    image = str(next((ade_root / "images" / "validation").glob("*.jpg")))
    cfg = load_config(tiny_config)
    sd = state(build(tiny_config))
    bad = dict(sd)
    _wrong_block(bad)
    with pytest.raises(CheckpointError, match=r"blocks\.1\.mlp\.fc1\.weight"):
        infer(cfg, str(save(bad, tmp_path / "bad.pth")), image, str(tmp_path / "a.png"), device="cpu")
    good = save(sd, tmp_path / "good.pth", checksum=True)
    result = infer(load_config(tiny_config), str(good), image, str(tmp_path / "b.png"), device="cpu")
    assert result.pred.shape == (64, 96) and set(result.shares) <= {"a", "b", "c"}
    obj = torch.load(good, weights_only=True)
    obj["state_dict"]["decode_head.conv_seg.bias"] += 1  # changed after it was written
    torch.save(obj, tmp_path / "changed.pth")
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        infer(load_config(tiny_config), str(tmp_path / "changed.pth"), image, str(tmp_path / "c.png"), device="cpu")


# --------------------------------------------------------------------------- a segmentor MMSeg trained
def test_a_segmentor_trained_with_mmsegs_own_mae_backbone_evaluates_the_same(tiny_config, tmp_path, capsys):
    """The same UperNet with MMSeg's ``MAE`` backbone (``backbone.layers.N...``, ``gamma_1/2``,
    tables and their index), random weights: its file loads into our segmentor (the backbone
    through the MMSeg reader, neck and heads by name), which then computes the same logits; and
    ``segment test`` takes it."""
    import copy
    import math

    cfg = load_config(tiny_config, [])
    init_default_scope("mmseg")
    theirs_cfg = copy.deepcopy(cfg.model)
    theirs_cfg.backbone = dict(type="MAE", img_size=64, patch_size=16, embed_dims=TINY_VIT["embed_dim"],
                               num_layers=TINY_VIT["depth"], num_heads=TINY_VIT["num_heads"], mlp_ratio=4,
                               out_indices=[0, 1, 2, 3], drop_path_rate=0.0, init_values=1.0, final_norm=False,
                               norm_cfg=dict(type="LN", eps=1e-6))
    theirs = MODELS.build(theirs_cfg).eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            r = torch.randn(p.shape, generator=g)
            p.copy_(0.5 + torch.rand(p.shape, generator=g) if "gamma" in name else
                    0.1 * r if p.ndim == 1 or "table" in name or name.endswith(("pos_embed", "cls_token")) else
                    r / math.sqrt(p[0].numel()))
    path = save(state(theirs), tmp_path / "mmseg_trained.pth")
    ours = build(tiny_config).eval()
    report = load_segmentor_state(ours, torch.load(path, weights_only=True), str(path))
    assert any("mmseg-mae" in n for n in report.notes) and not report.resampled
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want, got = theirs.encode_decode(x, [dict(img_shape=(64, 64))] * 2), ours.encode_decode(
            x, [dict(img_shape=(64, 64))] * 2)
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()
    # through the command a user runs
    rc = main(["segment", "test", str(tiny_config), str(path), "--work-dir", str(tmp_path / "work")])
    out, err = capsys.readouterr()
    assert rc == 0 and "mIoU" in out + err, err[-2000:]
