"""Pretrained encoders into the backbone (strict, resampled, reported) and safe detector weights."""
from __future__ import annotations

import logging
import os
import pickle

import pytest
import torch
from detectron2.modeling.backbone.fpn import LastLevelMaxPool

from detection import SafeDetectionCheckpointer, SimpleFeaturePyramid, load_pretrained
from mae_backbone import CheckpointError, UnsafeCheckpointError, create_vit
from mae_backbone.checkpoint import write_checkpoint


def pretrained_vit(**kw):
    """A plain ViT as pretraining leaves it: 224 px (14x14 grid), class token, final norm."""
    return create_vit("vit_tiny_patch16", depth=2, img_size=224, **kw)


def detection_backbone(**kw) -> SimpleFeaturePyramid:
    vit = create_vit("vit_tiny_patch16", depth=2, img_size=64, window_size=2, global_blocks=(1,), rel_pos=True,
                     pos_embed_learnable=True)
    return SimpleFeaturePyramid(vit, top_block=LastLevelMaxPool(), square_pad=64, **kw)


def _save(sd, path, fmt):
    if fmt == "mae":  # the official MAE pretraining file: {"model": encoder + decoder}
        sd = {**sd, "mask_token": torch.zeros(1, 1, 128), "decoder_embed.weight": torch.zeros(128, 192)}
        torch.save({"model": sd}, path)
        return path
    return write_checkpoint(sd, path, fmt)


@pytest.mark.parametrize("fmt, suffix", [("mae", ".pth"), ("timm", ".pth"), ("ours", ".safetensors"),
                                         ("mocov3", ".pth.tar")])
def test_pretrained_encoder_loads_with_the_expected_report(tmp_path, fmt, suffix):
    torch.manual_seed(0)
    source = pretrained_vit()
    path = _save(source.state_dict(), tmp_path / f"encoder{suffix}", fmt)
    backbone = detection_backbone()
    report = load_pretrained(backbone, path)
    assert report.missing == [f"blocks.{i}.attn.rel_pos_{a}" for i in range(2) for a in "hw"]
    assert report.unexpected == ["cls_token", "norm.bias", "norm.weight"]
    assert "pos_embed" in report.resampled and "(1, 197, 192) -> (1, 17, 192)" in report.resampled["pos_embed"]
    torch.testing.assert_close(backbone.net.blocks[1].mlp.fc1.weight, source.blocks[1].mlp.fc1.weight)
    if fmt == "mae":
        assert any("decoder" in note for note in report.notes)


def test_builder_argument_loads_and_logs_the_report(tmp_path):
    source = pretrained_vit()
    path = write_checkpoint(source.state_dict(), tmp_path / "vit.safetensors", "ours")
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    log = logging.getLogger("detection.checkpoint")
    log.addHandler(handler)
    old_level = log.level
    log.setLevel(logging.INFO)
    try:
        backbone = detection_backbone(pretrained=str(path))
    finally:
        log.removeHandler(handler)
        log.setLevel(old_level)
    torch.testing.assert_close(backbone.net.patch_embed.proj.weight, source.patch_embed.proj.weight)
    text = "\n".join(r.getMessage() for r in records)
    assert "resampled" in text and "pos_embed" in text and "rel_pos_h" in text


def test_a_checkpoint_missing_a_block_key_is_an_error(tmp_path):
    sd = pretrained_vit().state_dict()
    del sd["blocks.1.mlp.fc1.weight"]
    path = write_checkpoint(sd, tmp_path / "broken.pth", "timm")
    with pytest.raises(CheckpointError, match=r"missing from the checkpoint: blocks\.1\.mlp\.fc1\.weight"):
        load_pretrained(detection_backbone(), path)


def test_a_checkpoint_with_foreign_keys_is_an_error(tmp_path):
    sd = {**pretrained_vit().state_dict(), "dist_head.weight": torch.zeros(3)}
    path = write_checkpoint(sd, tmp_path / "odd.pth", "timm")
    with pytest.raises(CheckpointError, match="dist_head.weight"):
        load_pretrained(detection_backbone(), path)


def test_vit_h_style_patch_14_checkpoint_is_resampled_to_patch_16(tmp_path):
    sd = create_vit("vit_tiny_patch16", patch_size=14, depth=2, img_size=224).state_dict()
    path = write_checkpoint(sd, tmp_path / "h14.pth", "timm")
    report = load_pretrained(detection_backbone(), path)
    assert report.resampled["patch_embed.proj.weight"].startswith("(192, 3, 14, 14) -> (192, 3, 16, 16)")


# --------------------------------------------------------------------------- detector weights
class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_detector_checkpoint_round_trip_through_weights_only(tmp_path):
    model = detection_backbone()
    SafeDetectionCheckpointer(model, str(tmp_path)).save("model_x", iteration=7)
    fresh = detection_backbone()
    extra = SafeDetectionCheckpointer(fresh).load(str(tmp_path / "model_x.pth"))
    assert extra["iteration"] == 7
    for k, v in model.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[k], v)


def test_pkl_weights_are_refused_unless_trusted(tmp_path):
    model = detection_backbone()
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    path = tmp_path / "zoo.pkl"
    path.write_bytes(pickle.dumps({"model": sd, "__author__": "someone"}))
    with pytest.raises(UnsafeCheckpointError, match="--trust-pickle"):
        SafeDetectionCheckpointer(detection_backbone()).load(str(path))
    trusted = detection_backbone()
    SafeDetectionCheckpointer(trusted, trust_pickle=True).load(str(path))
    torch.testing.assert_close(trusted.net.pos_embed, model.net.pos_embed)


def test_a_pth_that_would_run_code_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": {}, "payload": _RunsCode()}, path)
    with pytest.raises(UnsafeCheckpointError, match="refused"):
        SafeDetectionCheckpointer(detection_backbone()).load(str(path))


def test_an_encoder_given_as_detector_weights_is_an_error(tmp_path):
    path = write_checkpoint(pretrained_vit().state_dict(), tmp_path / "encoder.pth", "mae")
    with pytest.raises(CheckpointError, match="pretrained"):
        SafeDetectionCheckpointer(detection_backbone()).load(str(path))
