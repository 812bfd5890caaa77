"""Pretrained encoders into the backbone (strict, resampled, reported) and safe detector weights."""
from __future__ import annotations

import logging
import pickle
from pathlib import Path

import pytest
import torch
from detectron2.modeling.backbone.fpn import LastLevelMaxPool

from detection import SafeDetectionCheckpointer, SimpleFeaturePyramid, load_pretrained
from mae_backbone import CheckpointError, UnsafeCheckpointError, create_vit
from mae_backbone.checkpoint import write_checkpoint

from unsafe_pickle import RunsCode


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
    log = logging.getLogger("detectron2.detection.checkpoint")
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


def test_the_recipes_backbone_keeps_a_224_px_encoders_table_as_it_is(tmp_path):
    """ViTDet (pretrain_img_size=224): an MAE encoder's 14x14 table is the parameter, unresampled;
    it is interpolated to the input's grid (4x4 at 64 px) on every forward."""
    from detectron2.config import instantiate

    from det_helpers import tiny_overrides
    from detection import load_config

    source = pretrained_vit()
    path = _save(source.state_dict(), tmp_path / "mae.pth", "mae")
    backbone = instantiate(load_config("mask_rcnn_vitdet_b_100ep", tiny_overrides()).model.backbone)
    report = load_pretrained(backbone, path)
    assert "pos_embed" not in report.resampled and backbone.net.pos_embed.shape == (1, 197, 192)
    assert torch.equal(backbone.net.pos_embed, source.pos_embed)


def test_vit_h_style_patch_14_checkpoint_is_resampled_to_patch_16(tmp_path):
    sd = create_vit("vit_tiny_patch16", patch_size=14, depth=2, img_size=224).state_dict()
    path = write_checkpoint(sd, tmp_path / "h14.pth", "timm")
    report = load_pretrained(detection_backbone(), path)
    assert report.resampled["patch_embed.proj.weight"].startswith("(192, 3, 14, 14) -> (192, 3, 16, 16)")


# --------------------------------------------------------------------------- detector weights
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
    torch.save({"model": {}, "payload": RunsCode(tmp_path / "pwned")}, path)
    with pytest.raises(UnsafeCheckpointError, match="refused"):
        SafeDetectionCheckpointer(detection_backbone()).load(str(path))
    assert not (tmp_path / "pwned").exists()


def test_an_encoder_given_as_detector_weights_is_an_error(tmp_path):
    path = write_checkpoint(pretrained_vit().state_dict(), tmp_path / "encoder.pth", "mae")
    with pytest.raises(CheckpointError, match="pretrained"):
        SafeDetectionCheckpointer(detection_backbone()).load(str(path))


# --------------------------------------------------------------------------- whole detectors, strictly
def vitdet_backbone_layout(depth: int, dim: int, heads: int, window: int, grid: int, global_blocks: tuple[int, ...],
                           out_channels: int = 256, patch: int = 16, pretrain_grid: int = 14) -> dict[str, tuple]:
    """Keys and shapes of Detectron2's ViTDet backbone, written out from its code
    (``detectron2/modeling/backbone/vit.py``: ``ViT`` under ``backbone.net``, ``SimpleFeaturePyramid``
    with ``norm="LN"`` (convs without bias) and scale factors 4, 2, 1, 0.5; ``use_rel_pos=True``;
    ``pos_embed`` at ``pretrain_img_size`` 224 with the class slot: 1 + 14 * 14 = 197 tokens;
    rel-pos tables 2 * window - 1 in windowed blocks, 2 * (img_size / patch) - 1 in global ones)."""
    n, c, hd = "backbone.net.", out_channels, dim // heads
    shapes: dict[str, tuple] = {n + "pos_embed": (1, 1 + pretrain_grid**2, dim),
                                n + "patch_embed.proj.weight": (dim, 3, patch, patch),
                                n + "patch_embed.proj.bias": (dim,)}
    for i in range(depth):
        b, size = f"{n}blocks.{i}.", grid if i in global_blocks else window
        shapes.update({b + "norm1.weight": (dim,), b + "norm1.bias": (dim,),
                       b + "attn.qkv.weight": (3 * dim, dim), b + "attn.qkv.bias": (3 * dim,),
                       b + "attn.proj.weight": (dim, dim), b + "attn.proj.bias": (dim,),
                       b + "attn.rel_pos_h": (2 * size - 1, hd), b + "attn.rel_pos_w": (2 * size - 1, hd),
                       b + "norm2.weight": (dim,), b + "norm2.bias": (dim,),
                       b + "mlp.fc1.weight": (4 * dim, dim), b + "mlp.fc1.bias": (4 * dim,),
                       b + "mlp.fc2.weight": (dim, 4 * dim), b + "mlp.fc2.bias": (dim,)})

    def convs(stage: str, first: int, in_dim: int) -> None:  # 1x1 then 3x3 Conv2d, each with an "LN" norm
        for j, (k, cin) in enumerate(((1, in_dim), (3, c))):
            shapes.update({f"{stage}.{first + j}.weight": (c, cin, k, k), f"{stage}.{first + j}.norm.weight": (c,),
                           f"{stage}.{first + j}.norm.bias": (c,)})

    s = "backbone.simfp_2"  # ConvTranspose(dim, dim/2), LN, GELU, ConvTranspose(dim/2, dim/4)
    shapes.update({f"{s}.0.weight": (dim, dim // 2, 2, 2), f"{s}.0.bias": (dim // 2,), f"{s}.1.weight": (dim // 2,),
                   f"{s}.1.bias": (dim // 2,), f"{s}.3.weight": (dim // 2, dim // 4, 2, 2), f"{s}.3.bias": (dim // 4,)})
    convs(s, 4, dim // 4)
    s = "backbone.simfp_3"  # ConvTranspose(dim, dim/2)
    shapes.update({f"{s}.0.weight": (dim, dim // 2, 2, 2), f"{s}.0.bias": (dim // 2,)})
    convs(s, 1, dim // 2)
    convs("backbone.simfp_4", 0, dim)  # identity
    convs("backbone.simfp_5", 1, dim)  # MaxPool2d (no weights)
    return shapes


TINY_VITDET = dict(depth=2, dim=192, heads=3, window=2, grid=4, global_blocks=(1,))  # ViT-tiny at 64 px


def vitdet_b(*extra: str, seed: int = 0):
    """``mask_rcnn_vitdet_b_100ep.py`` with a tiny ViT (det_helpers.tiny_overrides), every tensor random
    and non-zero (rel-pos tables, LayerNorm affine parameters, the heads)."""
    from detectron2.config import instantiate

    from det_helpers import tiny_overrides
    from detection import load_config

    torch.manual_seed(seed)
    model = instantiate(load_config("mask_rcnn_vitdet_b_100ep", [*tiny_overrides(), *extra]).model)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return model.eval()


def _log_records(name: str):
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    log = logging.getLogger(name)
    log.addHandler(handler)
    return records, handler, log


def test_a_vitdet_layout_detector_loads_with_no_key_skipped_and_the_same_features(tmp_path):
    source = vitdet_b(seed=1)
    sd = source.state_dict()
    layout = vitdet_backbone_layout(**TINY_VITDET)
    assert {k: tuple(v.shape) for k, v in sd.items() if k.startswith("backbone.")} == layout
    assert sd["backbone.net.pos_embed"].shape == (1, 197, 192)  # the pretraining-size table, as ViTDet's
    path = tmp_path / "vitdet.pth"
    torch.save({"model": sd, "iteration": 100}, path)  # what Detectron2's checkpointer writes (+ optimizer ...)

    target = vitdet_b(seed=2)
    records, handler, log = _log_records("fvcore.common.checkpoint")  # Detectron2's default_setup shows it
    try:
        checkpointer = SafeDetectionCheckpointer(target)
        checkpointer.load(str(path))
    finally:
        log.removeHandler(handler)
    report = checkpointer.last_report
    assert report.loaded == sorted(sd) and not (report.missing or report.unexpected or report.resampled
                                                or report.skipped_by_shape)
    assert not [r for r in records if r.levelno >= logging.WARNING]
    for k, v in sd.items():
        assert torch.equal(target.state_dict()[k], v), k
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ours, theirs = target.backbone(x), source.backbone(x)
    assert list(ours) == ["p2", "p3", "p4", "p5", "p6"]
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name


def test_grid_sized_tensors_are_resampled_and_reported_on_detectron2s_logger(tmp_path):
    """A table grid of another size (our older 64 px detectors kept 4x4 + class slot) and rel-pos
    tables trained at another input size (global block: 128 px -> 2*8-1) load resampled, reported."""
    from mae_backbone import resample_abs_pos_embed, resample_rel_pos

    old = vitdet_b("model.backbone.net.pretrain_img_size=64", "model.backbone.net.img_size=128",
                   "model.backbone.square_pad=128", seed=3)
    sd = old.state_dict()
    assert sd["backbone.net.pos_embed"].shape == (1, 17, 192)
    assert sd["backbone.net.blocks.1.attn.rel_pos_h"].shape == (15, 64)
    path = tmp_path / "old.pth"
    torch.save({"model": sd}, path)
    model = vitdet_b(seed=4)
    records, handler, log = _log_records("fvcore.common.checkpoint")
    log.setLevel(logging.INFO)
    try:
        checkpointer = SafeDetectionCheckpointer(model)
        checkpointer.load(str(path))
    finally:
        log.removeHandler(handler)
    report = checkpointer.last_report
    assert set(report.resampled) == {"backbone.net.pos_embed", "backbone.net.blocks.1.attn.rel_pos_h",
                                     "backbone.net.blocks.1.attn.rel_pos_w"}
    assert report.resampled["backbone.net.pos_embed"].startswith("(1, 17, 192) -> (1, 197, 192) (bicubic")
    assert report.resampled["backbone.net.blocks.1.attn.rel_pos_h"] == "(15, 64) -> (7, 64) (linear)"
    torch.testing.assert_close(model.backbone.net.pos_embed, resample_abs_pos_embed(sd["backbone.net.pos_embed"], 14))
    torch.testing.assert_close(model.backbone.net.blocks[1].attn.rel_pos_w,
                               resample_rel_pos(sd["backbone.net.blocks.1.attn.rel_pos_w"], 7))
    text = "\n".join(r.getMessage() for r in records)
    assert "resampled" in text and "backbone.net.pos_embed: (1, 17, 192) -> (1, 197, 192)" in text


def _other_classes(tmp_path, classes: int = 3):
    sd = vitdet_b(f"model.roi_heads.num_classes={classes}", seed=5).state_dict()
    path = tmp_path / "other_classes.pth"
    torch.save({"model": sd}, path)
    return path, sd


def test_a_detector_whose_tensors_do_not_fit_is_refused_naming_them(tmp_path):
    path, sd = _other_classes(tmp_path)
    model = vitdet_b(seed=6)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError) as err:
        SafeDetectionCheckpointer(model).load(str(path))
    msg = str(err.value)
    assert str(path) in msg and "nothing was loaded" in msg and "init_checkpoint_skip" in msg
    assert "roi_heads.box_predictor.cls_score.weight: checkpoint (4, 1024), model (81, 1024)" in msg
    assert "roi_heads.mask_head.predictor.weight: checkpoint (3, 256, 1, 1), model (80, 256, 1, 1)" in msg
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # untouched

    sd = vitdet_b(seed=5).state_dict()
    del sd["backbone.simfp_3.1.norm.bias"]
    sd["roi_heads.extra.weight"] = torch.zeros(2)
    torch.save({"model": sd}, tmp_path / "odd.pth")
    with pytest.raises(CheckpointError, match=r"missing from the checkpoint: backbone\.simfp_3\.1\.norm\.bias \| "
                                              r"in the checkpoint but not in the model: roi_heads\.extra\.weight"):
        SafeDetectionCheckpointer(vitdet_b()).load(str(tmp_path / "odd.pth"))


def test_a_partial_load_is_explicit_and_reported(tmp_path):
    path, sd = _other_classes(tmp_path)
    model = vitdet_b(seed=6)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    skip = ["roi_heads.box_predictor.cls_score.*", "roi_heads.box_predictor.bbox_pred.*",
            "roi_heads.mask_head.predictor.*"]
    records, handler, log = _log_records("fvcore.common.checkpoint")
    try:
        checkpointer = SafeDetectionCheckpointer(model, skip_keys=skip)
        checkpointer.load(str(path))
    finally:
        log.removeHandler(handler)
    skipped = set(checkpointer.last_report.skipped_by_shape)
    assert skipped == {f"roi_heads.{m}.{p}" for m in ("box_predictor.cls_score", "box_predictor.bbox_pred",
                                                      "mask_head.predictor") for p in ("weight", "bias")}
    for k, v in model.state_dict().items():
        assert torch.equal(v, init[k] if k in skipped else sd[k]), k
    warnings = "\n".join(r.getMessage() for r in records if r.levelno == logging.WARNING)
    assert "skipped (shape)" in warnings and "roi_heads.box_predictor.cls_score.weight" in warnings


def test_detect_eval_with_a_head_that_does_not_fit_fails_naming_the_keys(tmp_path, tiny_coco, capsys):
    """Detectron2's checkpointer would skip the head with a warning and report a score of random heads."""
    from detectron2.config import instantiate

    from detection import load_config
    from mae_transfer.cli import main

    tiny = str(Path(__file__).parent / "configs" / "tiny_mask_rcnn_vitdet.py")
    model = instantiate(load_config(tiny, ["model.roi_heads.num_classes=3"]).model)
    path = tmp_path / "three_classes.pth"
    torch.save({"model": model.state_dict()}, path)
    json_file, images = (str(p) for p in tiny_coco)
    before = path.read_bytes()
    rc = main(["detect", "eval", tiny, "--weights", str(path), "--output", str(tmp_path / "e"),
               "--register-coco", "tiny_val", json_file, images])
    out, err = capsys.readouterr()
    assert rc == 2 and str(path) in err and "roi_heads.box_predictor.cls_score.weight" in err
    assert "Traceback" not in out + err and path.read_bytes() == before
    assert not (tmp_path / "e" / "eval_results.json").exists()


def test_fine_tuning_from_other_classes_needs_the_explicit_skip(tmp_path, tiny_coco, capsys):
    """``detect train`` with ``train.init_checkpoint`` of a detector with 3 classes into a 2-class config:
    refused, naming the keys; with ``train.init_checkpoint_skip`` it trains, and the log says what was left."""
    from detectron2.config import instantiate

    from detection import load_config
    from mae_transfer.cli import main

    tiny = str(Path(__file__).parent / "configs" / "tiny_mask_rcnn_vitdet.py")
    path = tmp_path / "three_classes.pth"
    torch.save({"model": instantiate(load_config(tiny, ["model.roi_heads.num_classes=3"]).model).state_dict()}, path)
    json_file, images = (str(p) for p in tiny_coco)
    args = [tiny, "train.max_iter=1", "train.eval_period=0", f"train.init_checkpoint={path}"]
    register = ["--register-coco", "tiny_train", json_file, images, "--register-coco", "tiny_val", json_file, images]
    assert main(["detect", "train", *args, "--output", str(tmp_path / "strict"), *register]) == 2
    assert "roi_heads.box_predictor.cls_score.weight: checkpoint (4, 256), model (3, 256)" in capsys.readouterr().err
    skip = 'train.init_checkpoint_skip=["roi_heads.box_predictor.*", "roi_heads.mask_head.predictor.*"]'
    assert main(["detect", "train", *args, skip, "--output", str(tmp_path / "partial"), *register]) == 0
    log = (tmp_path / "partial" / "log.txt").read_text()
    assert "skipped (shape)" in log and "roi_heads.box_predictor.cls_score.weight" in log
