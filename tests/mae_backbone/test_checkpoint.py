"""Checkpoint formats, strict loading with reports, conversion CLI, and safety."""
from __future__ import annotations

import itertools
import json
import pickle

import pytest
import torch

from mae_backbone import CheckpointError, UnsafeCheckpointError, create_vit
from mae_backbone.checkpoint import (
    HEAD_KEYS,
    REL_POS_KEYS,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
    write_checkpoint,
)
from mae_backbone.formats import WRITERS
from mae_transfer.cli import main as cli

from unsafe_pickle import RunsCode

READ_FORMATS = ["ours", "timm", "mae", "mocov3", "hf", "detectron2", "mmseg"]
WRITE_FORMATS = ["ours", *WRITERS]


def _tiny(**kw):
    torch.manual_seed(0)
    m = create_vit("vit_tiny_patch16", depth=2, img_size=32, **kw)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    return m


def _path(tmp_path, fmt, tag=""):
    return tmp_path / (f"{fmt}{tag}" + {"ours": ".safetensors", "hf": ""}.get(fmt, ".pth"))


@pytest.mark.parametrize("src_fmt,dst_fmt", list(itertools.product(READ_FORMATS, WRITE_FORMATS)))
def test_round_trip_any_reader_to_any_writer_is_bit_identical(tmp_path, src_fmt, dst_fmt):
    sd = _tiny(num_classes=3).state_dict()
    meta = {"arch": "vit_tiny_patch16", "num_heads": 3}
    write_checkpoint(sd, _path(tmp_path, src_fmt), src_fmt, meta)
    mid, m1 = read_checkpoint(_path(tmp_path, src_fmt))
    assert m1["format"] == src_fmt  # detected automatically
    save_checkpoint(mid, tmp_path / "mid.safetensors", meta)
    ours, _ = read_checkpoint(tmp_path / "mid.safetensors")
    write_checkpoint(ours, _path(tmp_path, dst_fmt, "_out"), dst_fmt, meta)
    back, m2 = read_checkpoint(_path(tmp_path, dst_fmt, "_out"))
    assert m2["format"] == dst_fmt
    shared = set(back) & set(sd)
    # every format keeps the encoder; detectron2 drops cls/norm/head, mocov3/mmseg drop the head
    assert {k for k in sd if k.startswith("blocks.")} <= shared
    for k in shared:
        assert back[k].dtype == sd[k].dtype and torch.equal(back[k], sd[k]), k


def test_official_mae_pretrain_checkpoint_drops_decoder_with_a_note(tmp_path):
    sd = _tiny().state_dict()
    full = dict(sd, mask_token=torch.zeros(1, 1, 16), **{"decoder_embed.weight": torch.zeros(16, 192),
                                                          "decoder_pred.bias": torch.zeros(768)})
    torch.save({"model": full}, tmp_path / "mae_pretrain_vit_tiny.pth")
    model = create_vit("vit_tiny_patch16", depth=2, img_size=32)
    report = load_checkpoint(model, tmp_path / "mae_pretrain_vit_tiny.pth")
    assert report.format == "mae" and report.missing == [] and report.unexpected == []
    assert any("3 MAE decoder / mask token keys" in n for n in report.notes)
    assert all(torch.equal(model.state_dict()[k], sd[k]) for k in sd)


def test_mocov3_drops_projection_head_momentum_encoder_and_predictor(tmp_path):
    sd = _tiny().state_dict()
    obj = {"state_dict": {**{f"module.base_encoder.{k}": v for k, v in sd.items()},
                          "module.base_encoder.head.0.weight": torch.zeros(8, 192),
                          "module.momentum_encoder.cls_token": torch.zeros(1, 1, 192),
                          "module.predictor.0.weight": torch.zeros(8, 8)},
           "epoch": 300, "arch": "vit_tiny"}
    torch.save(obj, tmp_path / "moco.pth.tar")
    sd2, meta = read_checkpoint(tmp_path / "moco.pth.tar")
    assert meta["format"] == "mocov3" and set(sd2) == set(sd)
    assert len(meta["notes"]) == 2


def test_deit_distilled_token_is_removed_from_pos_embed(tmp_path):
    sd = _tiny().state_dict()
    pe = sd["pos_embed"]
    obj = {"model": dict(sd, dist_token=torch.zeros(1, 1, 192), pos_embed=torch.cat([pe[:, :1], pe[:, :1] + 1, pe[:, 1:]], 1),
                         **{"head_dist.weight": torch.zeros(3, 192)})}
    torch.save(obj, tmp_path / "deit.pth")
    sd2, meta = read_checkpoint(tmp_path / "deit.pth", format="deit")
    assert torch.equal(sd2["pos_embed"], pe) and "dist_token" not in sd2


def test_hf_export_equals_transformers_vit(tmp_path):
    import transformers  # the dev extra; set-up installs it
    model = _tiny().eval()
    write_checkpoint(model.state_dict(), tmp_path / "hf", "hf", {"num_heads": 3})
    hf = transformers.ViTModel.from_pretrained(tmp_path / "hf", add_pooling_layer=False).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(hf(pixel_values=x).last_hidden_state, model.forward_features(x), rtol=0, atol=1e-5)


def test_hf_vitmae_folder_reads_into_our_encoder(tmp_path):
    import transformers
    cfg = transformers.ViTMAEConfig(hidden_size=192, num_hidden_layers=2, num_attention_heads=3,
                                    intermediate_size=768, image_size=32, patch_size=16, mask_ratio=0.0, layer_norm_eps=1e-6,
                                    decoder_hidden_size=32, decoder_num_hidden_layers=1,
                                    decoder_num_attention_heads=2, decoder_intermediate_size=64)
    torch.manual_seed(0)
    hf = transformers.ViTMAEForPreTraining(cfg).eval()
    hf.save_pretrained(tmp_path / "vitmae")
    model = create_vit("vit_tiny_patch16", depth=2, img_size=32).eval()
    report = load_checkpoint(model, tmp_path / "vitmae")
    assert report.format == "hf" and report.missing == [] and any("decoder" in n for n in report.notes)
    x = torch.randn(1, 3, 32, 32)
    noise = torch.arange(4, dtype=torch.float32)[None]  # keep all patches in their order
    with torch.no_grad():
        ref = hf.vit(pixel_values=x, noise=noise).last_hidden_state
        torch.testing.assert_close(model.forward_features(x), ref, rtol=0, atol=1e-5)


def test_load_report_resamples_pos_embed_and_patch_kernel(tmp_path):
    src = create_vit("vit_huge_patch14", depth=1, img_size=28, embed_dim=64, num_heads=4)
    save_checkpoint(src, tmp_path / "h14.safetensors")
    dst = create_vit("vit_huge_patch14", depth=1, img_size=64, embed_dim=64, num_heads=4, patch_size=16)
    report = load_checkpoint(dst, tmp_path / "h14.safetensors")
    assert set(report.resampled) == {"pos_embed", "patch_embed.proj.weight"}
    assert "(1, 5, 64) -> (1, 17, 64)" in report.resampled["pos_embed"]
    assert dst.patch_embed.proj.weight.shape == (64, 3, 16, 16)
    assert "resampled" in str(report)


def test_head_of_another_size_is_skipped_only_when_allowed(tmp_path):
    save_checkpoint(_tiny(num_classes=1000), tmp_path / "in1k.safetensors")
    model = create_vit("vit_tiny_patch16", depth=2, img_size=32, num_classes=10)
    with pytest.raises(CheckpointError, match=r"head.weight: checkpoint \(1000, 192\), model \(10, 192\)"):
        load_checkpoint(model, tmp_path / "in1k.safetensors")
    report = load_checkpoint(model, tmp_path / "in1k.safetensors", allow_missing=HEAD_KEYS)
    assert set(report.skipped_by_shape) == {"head.weight", "head.bias"}
    assert set(report.missing) == {"head.weight", "head.bias"}


def test_finetune_load_allows_exactly_the_stated_keys(tmp_path):
    save_checkpoint(_tiny(), tmp_path / "pre.safetensors")
    model = create_vit("vit_tiny_patch16", depth=2, img_size=32, num_classes=5, global_pool=True)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(model, tmp_path / "pre.safetensors")
    msg = str(err.value)
    assert "pre.safetensors" in msg and "fc_norm.weight" in msg and "head.weight" in msg and "norm.weight" in msg
    report = load_checkpoint(model, tmp_path / "pre.safetensors", allow_missing=HEAD_KEYS, allow_unexpected=["norm.*"])
    assert sorted(report.missing) == ["fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight"]
    assert report.unexpected == ["norm.bias", "norm.weight"]


def test_dense_model_allows_new_rel_pos_keys(tmp_path):
    save_checkpoint(_tiny(), tmp_path / "pre.safetensors")
    model = create_vit("vit_tiny_patch16", depth=2, img_size=64, rel_pos=True, window_size=2, global_blocks=[1])
    report = load_checkpoint(model, tmp_path / "pre.safetensors", allow_missing=REL_POS_KEYS)
    assert len(report.missing) == 4 and "pos_embed" in report.resampled
    assert "blocks.*.attn.rel_pos_h (x2)" in str(report)


def test_wrong_architecture_is_a_clear_error(tmp_path):
    save_checkpoint(_tiny(), tmp_path / "tiny.safetensors")
    with pytest.raises(CheckpointError, match=r"tiny.safetensors.*looks like.*embed_dim.: 192"):
        load_checkpoint(create_vit("vit_small_patch16", depth=2, img_size=32), tmp_path / "tiny.safetensors")


def test_unknown_format_is_a_clear_error(tmp_path):
    torch.save({"weights": {"foo": torch.zeros(1)}}, tmp_path / "odd.pth")
    with pytest.raises(CheckpointError, match=r"odd.pth: cannot tell the checkpoint format.*weights"):
        read_checkpoint(tmp_path / "odd.pth")
    with pytest.raises(CheckpointError, match="unknown checkpoint format 'keras'"):
        read_checkpoint(tmp_path / "odd.pth", format="keras")


@pytest.mark.parametrize("suffix", [".pth", ".pkl"])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path, suffix):
    marker = tmp_path / "pwned"
    path = tmp_path / f"evil{suffix}"
    payload = {"model": {"cls_token": torch.zeros(1, 1, 192)}, "x": RunsCode(marker)}
    if suffix == ".pth":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload))
    with pytest.raises(UnsafeCheckpointError, match=r"evil.*refused to load.*(posix\.system|allow-list)"):
        read_checkpoint(path)
    with pytest.raises(UnsafeCheckpointError):
        load_checkpoint(create_vit("vit_tiny_patch16", depth=1), path)
    assert not marker.exists()


def test_truncated_and_bit_flipped_files_are_refused(tmp_path):
    save_checkpoint(_tiny(), tmp_path / "a.safetensors")
    torch.save({"model": _tiny().state_dict()}, tmp_path / "a.pth")
    for name in ("a.safetensors", "a.pth"):
        data = (tmp_path / name).read_bytes()
        (tmp_path / f"cut_{name}").write_bytes(data[: len(data) // 2])
        with pytest.raises(CheckpointError, match=f"cut_{name}: truncated or corrupt"):
            read_checkpoint(tmp_path / f"cut_{name}")
    data = bytearray((tmp_path / "a.safetensors").read_bytes())
    data[-100] ^= 0x40  # flip one bit inside the tensor data
    (tmp_path / "flip.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="flip.safetensors: checksum mismatch"):
        read_checkpoint(tmp_path / "flip.safetensors")
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty.pth: the file is empty"):
        read_checkpoint(tmp_path / "empty.pth")


def test_our_format_carries_metadata(tmp_path):
    save_checkpoint(create_vit("vit_tiny_patch16", img_size=64), tmp_path / "m.safetensors",
                    {"source": "unit test", "licence": "CC-BY-NC 4.0"})
    _, meta = read_checkpoint(tmp_path / "m.safetensors")
    assert meta["arch"] == "vit_tiny_patch16" and meta["img_size"] == [64, 64]
    assert meta["num_heads"] == 3 and meta["licence"] == "CC-BY-NC 4.0" and meta["format"] == "ours"


@pytest.mark.parametrize("fmt", WRITE_FORMATS)
def test_convert_cli_round_trip(tmp_path, fmt, capsys):
    sd = _tiny().state_dict()
    torch.save({"model": sd}, tmp_path / "official.pth")
    out = _path(tmp_path, fmt, "_cli")
    args = ["convert", str(tmp_path / "official.pth"), str(out), "--to", fmt]
    if fmt == "hf":  # a depth-2 ViT is not a registered size: the heads cannot be read off weights
        assert cli(args) == 2
        assert "needs 'num_heads'" in capsys.readouterr().err
        args += ["--num-heads", "3"]
    assert cli(args) == 0
    assert f"as {fmt!r}" in capsys.readouterr().out
    assert cli(["convert", str(out), str(tmp_path / "back.safetensors")]) == 0
    back, meta = read_checkpoint(tmp_path / "back.safetensors")
    assert meta["source"].startswith(f"{fmt}:")
    assert all(torch.equal(back[k], sd[k]) for k in set(back) & set(sd))
    if fmt == "hf":
        assert json.loads((out / "config.json").read_text())["num_attention_heads"] == 3


def test_batchnorm_step_counters_are_not_missing_weights(tmp_path):
    """A model with a BatchNorm head loads a checkpoint without one: only the head is missing."""
    save_checkpoint(_tiny(), tmp_path / "pre.safetensors")
    model = create_vit("vit_tiny_patch16", depth=2, img_size=32, num_classes=3)
    model.head = torch.nn.Sequential(torch.nn.BatchNorm1d(192, affine=False), torch.nn.Linear(192, 3))
    report = load_checkpoint(model, tmp_path / "pre.safetensors", allow_missing=["head.*"])
    assert sorted(report.missing) == ["head.0.running_mean", "head.0.running_var", "head.1.bias", "head.1.weight"]
