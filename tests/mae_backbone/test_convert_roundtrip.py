"""``mae-transfer convert`` round trips between our layout and the dense-task layouts, through the
installed console script: ours -> X -> ours gives every tensor X carries back unchanged, and the
tensors X has no place for are named (never claimed as written).

| X           | has no place for                                  |
|-------------|---------------------------------------------------|
| hf-vitdet   | ``cls_token``, final ``norm``, ``fc_norm``, ``head`` |
| detectron2  | the same (ViTDet's ``ViT``)                        |
| mmseg       | ``head``, ``fc_norm`` (classifier parts)           |
| mmseg-mae   | the same (MMSeg ``MAE``: BEiT tables and layer scale carried) |
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mae_backbone
from mae_backbone import CheckpointError, create_vit
from mae_backbone.checkpoint import read_checkpoint, save_checkpoint
from mae_backbone.formats import WRITERS, detect_format, read_hf_vitdet, write_hf_vitdet
from mae_transfer.cli import main as cli

EXE = str(Path(sys.executable).parent / "mae-transfer")
VITDET_ABSENT = ["cls_token", "head.bias", "head.weight", "norm.bias", "norm.weight"]


def _randomize(model: torch.nn.Module) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model


def vitdet_like() -> torch.nn.Module:
    """A classifier-shaped ViT (class token, final norm, head) with ViTDet's windows and rel-pos."""
    return _randomize(create_vit("vit_tiny_patch16", embed_dim=64, depth=4, num_heads=4, img_size=128,
                                 pretrain_img_size=64, window_size=4, global_blocks=(1, 3), rel_pos=True,
                                 num_classes=5))


def plain() -> torch.nn.Module:
    return _randomize(create_vit("vit_tiny_patch16", embed_dim=64, depth=2, num_heads=4, img_size=32, num_classes=5))


def beit_like() -> torch.nn.Module:
    """MMSeg's MAE options: a BEiT relative position table per block and layer scale."""
    return _randomize(create_vit("vit_tiny_patch16", embed_dim=64, depth=2, num_heads=4, img_size=32,
                                 rel_pos="beit", init_values=0.1, num_classes=5))


CASES = {  # format -> (model, what the layout cannot carry)
    "hf-vitdet": (vitdet_like, VITDET_ABSENT),
    "detectron2": (vitdet_like, VITDET_ABSENT),
    "mmseg": (plain, ["head.bias", "head.weight"]),
    "mmseg-mae": (beit_like, ["head.bias", "head.weight"]),
}


def convert(*args: str) -> str:
    proc = subprocess.run([EXE, "convert", *args], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.mark.parametrize("fmt", list(CASES))
def test_round_trip_through_the_cli_names_what_the_layout_drops(tmp_path, fmt):
    build, absent = CASES[fmt]
    sd = build().state_dict()
    save_checkpoint(sd, tmp_path / "ours.safetensors", {"num_heads": 4})
    out = convert(str(tmp_path / "ours.safetensors"), str(tmp_path / f"{fmt}.pth"), "--to", fmt)
    assert f"wrote {len(sd) - len(absent)} of {len(sd)} tensors as {fmt!r}" in out
    assert f"does not carry {len(absent)} tensors" in out and ", ".join(absent) in out
    back_out = convert(str(tmp_path / f"{fmt}.pth"), str(tmp_path / "back.safetensors"))
    assert f"wrote {len(sd) - len(absent)} of {len(sd) - len(absent)} tensors as 'ours'" in back_out
    back, meta = read_checkpoint(tmp_path / "back.safetensors")
    assert meta["source"].startswith(f"{fmt}:")
    assert sorted(set(sd) - set(back)) == absent and not set(back) - set(sd)
    for k, v in back.items():
        assert v.dtype == sd[k].dtype and torch.equal(v, sd[k]), k


def test_a_writer_that_changes_a_tensor_is_caught(tmp_path, monkeypatch, capsys):
    """The CLI reads what it wrote back: a (hypothetically) broken writer is an error, not a success."""
    save_checkpoint(plain().state_dict(), tmp_path / "ours.safetensors")

    def broken(sd, meta):
        return {k: (v + 1 if k == "pos_embed" else v) for k, v in sd.items()}

    monkeypatch.setitem(WRITERS, "timm", broken)
    assert cli(["convert", str(tmp_path / "ours.safetensors"), str(tmp_path / "t.pth"), "--to", "timm"]) == 2
    assert "changed ['pos_embed']" in capsys.readouterr().err


def test_hf_vitdet_is_detected_apart_from_hf_vit():
    sd = vitdet_like().state_dict()
    assert detect_format(write_hf_vitdet(sd, {})) == "hf-vitdet"
    assert detect_format({"embeddings.patch_embeddings.projection.weight": torch.zeros(1)}) == "hf"


def test_hf_vitdet_writer_refuses_what_would_change_the_network():
    sd = vitdet_like().state_dict()
    with pytest.raises(CheckpointError, match=r"blocks\.0\.ls1\.gamma"):
        write_hf_vitdet({**sd, "blocks.0.ls1.gamma": torch.ones(64)}, {})
    with pytest.raises(CheckpointError, match="pos_embed"):  # no class-token slot: not VitDet's table
        write_hf_vitdet({**sd, "pos_embed": torch.zeros(1, 16, 64)}, {})
    with pytest.raises(CheckpointError, match="residual"):
        read_hf_vitdet({**write_hf_vitdet(sd, {}), "encoder.layer.1.residual.conv1.weight": torch.zeros(1)}, [])


def test_load_checkpoint_is_exported_and_strict(tmp_path):
    """Item 9: ``import mae_backbone; mae_backbone.load_checkpoint`` is the strict loader."""
    from mae_backbone import checkpoint

    assert mae_backbone.load_checkpoint is checkpoint.load_checkpoint
    assert "load_checkpoint" in mae_backbone.__all__
    sd = plain().state_dict()
    model = create_vit("vit_tiny_patch16", embed_dim=64, depth=2, num_heads=4, img_size=32, num_classes=5)
    report = mae_backbone.load_checkpoint(model, sd)
    assert sorted(report.loaded) == sorted(sd) and not report.missing
    with pytest.raises(CheckpointError, match="blocks.9.extra"):
        mae_backbone.load_checkpoint(model, {**sd, "blocks.9.extra": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="head.weight"):
        mae_backbone.load_checkpoint(model, {k: v for k, v in sd.items() if k != "head.weight"})
