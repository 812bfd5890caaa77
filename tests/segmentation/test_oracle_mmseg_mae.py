"""Our ``MAEViT`` with the BEiT options against MMSeg 1.2.2's own ``MAE`` backbone (independent code).

MMSeg's ``MAE`` (``mmseg/models/backbones/mae.py``, a ``BEiT`` subclass) is the backbone of
``mae-base_upernet_8xb2-amp-160k_ade20k-512x512.py`` (48.13 mIoU): per layer a BEiT relative
position bias table (with the class-token entries) and layer scale ``gamma_1/2``, a full qkv bias,
LayerNorm eps 1e-6 (``_base_/models/upernet_mae.py``), outputs without a final norm.  Every weight
is random here (tables, gammas, LayerNorm affine parameters, biases), so that every term counts.
MMSeg's ``MAE`` runs at its ``img_size`` only (it adds ``pos_embed`` without resampling), so each
size builds its own pair: the config's 512 x 512 and a non-square 96 x 160.
"""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from mmengine.registry import init_default_scope
from mmseg.models.backbones import MAE
from mmseg.registry import MODELS

from mae_backbone.checkpoint import read_checkpoint, save_checkpoint, write_checkpoint
from mae_backbone.formats import detect_format
from mae_transfer.cli import main as cli
from segmentation import MAEViT, load_config

from seg_helpers import TINY_VIT

DIM, DEPTH, HEADS, PATCH = 32, 4, 2, 16
OUT = [0, 1, 3]  # a subset, out of order with the depth: the outputs are picked, not all blocks
SIZES = [(512, 512), (96, 160)]  # the ADE20K config's crop; a non-square one


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Every parameter random and non-trivial: weights ~ 1/sqrt(fan-in), LayerNorm weights around 1,
    biases, tables, tokens and position embeddings of a size that changes the outputs, gammas in
    (0.5, 1.5)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if "gamma" in name:
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
            elif p.ndim == 1 and (".ln" in name or ".norm" in name) and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * r)
            elif "relative_position_bias_table" in name:
                p.copy_(0.5 * r)
            elif p.ndim == 1 or name.endswith(("pos_embed", "cls_token")):
                p.copy_(0.1 * r)
            else:
                p.copy_(r / math.sqrt(p[0].numel()))


def mmseg_mae(img_size: tuple[int, int], final_norm: bool = False) -> MAE:
    model = MAE(img_size=img_size, patch_size=PATCH, embed_dims=DIM, num_layers=DEPTH, num_heads=HEADS, mlp_ratio=4,
                out_indices=OUT, drop_path_rate=0.0, norm_cfg=dict(type="LN", eps=1e-6), init_values=0.3,
                final_norm=final_norm)
    randomize(model, seed=img_size[0])
    model.eval()  # (BEiT.train returns None: no chaining)
    return model


def ours(img_size: tuple[int, int], **kw) -> MAEViT:
    kw.setdefault("use_rel_pos", "beit")
    kw.setdefault("init_values", 1.0)
    return MAEViT(arch=dict(embed_dim=DIM, depth=DEPTH, num_heads=HEADS), img_size=img_size, out_indices=OUT,
                  **kw).eval()


def assert_same_outputs(a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...]) -> None:
    assert len(a) == len(b) == len(OUT)
    for x, y in zip(a, b):
        assert x.shape == y.shape
        rel = (x - y).abs().max() / y.abs().max()
        assert rel <= 1e-5, f"relative difference {rel:.2e}"


def mmseg_file(model: MAE, path: Path) -> Path:
    torch.save({"state_dict": model.state_dict(), "meta": {}}, path)
    return path


# --------------------------------------------------------------------------- the same function
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_mmseg_mae_weights_give_the_same_multi_level_outputs(size, tmp_path):
    ref = mmseg_mae(size)
    path = mmseg_file(ref, tmp_path / "mmseg_mae.pth")
    sd, meta = read_checkpoint(path)
    assert meta["format"] == "mmseg-mae"
    assert any("relative_position_index" in n for n in meta["notes"])  # dropped, and said so
    model = ours(size)
    model.vit.load_state_dict(sd, strict=True)  # every tensor has its place, nothing left over
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert_same_outputs(model(x), ref(x))
    # the same file through MAEViT's `pretrained` loader: nothing missing, nothing unexpected
    loaded = ours(size, pretrained=str(path))
    loaded.init_weights()
    report = loaded.load_report
    assert report.format == "mmseg-mae" and not report.missing and not report.unexpected and not report.resampled
    with torch.no_grad():
        assert_same_outputs(loaded(x), ref(x))


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_our_weights_written_as_mmseg_mae_load_strictly_into_mmseg(size, tmp_path):
    model = ours(size, init_values=0.7)
    randomize(model, seed=7)
    path = write_checkpoint(model.vit.state_dict(), tmp_path / "ours_as_mmseg.pth", "mmseg-mae",
                            meta=dict(img_size=list(size), patch_size=PATCH))
    obj = torch.load(path, weights_only=True)
    assert detect_format(obj) == "mmseg-mae"
    ref = MAE(img_size=size, patch_size=PATCH, embed_dims=DIM, num_layers=DEPTH, num_heads=HEADS, out_indices=OUT,
              norm_cfg=dict(type="LN", eps=1e-6), init_values=1.0)
    ref.eval()
    ref.load_state_dict(obj["state_dict"], strict=True)  # relative_position_index included, and right:
    for layer in ref.layers:
        assert layer.attn.relative_position_index.dtype == torch.long
    fresh = MAE(img_size=size, patch_size=PATCH, embed_dims=DIM, num_layers=DEPTH, num_heads=HEADS)
    assert torch.equal(obj["state_dict"]["layers.2.attn.relative_position_index"],
                       fresh.layers[2].attn.relative_position_index)
    x = torch.randn(1, 3, *size)
    with torch.no_grad():
        assert_same_outputs(model(x), ref(x))


def test_final_norm_and_the_classifier(tmp_path):
    """A pretrain/fine-tune ViT's final norm is MMSeg's ``ln1`` (``final_norm=True``); the head is
    left out (MMSeg backbones have none), which ``convert`` reports."""
    src = mmseg_mae((64, 64), final_norm=True)
    sd, _ = read_checkpoint(mmseg_file(src, tmp_path / "with_norm.pth"))
    assert torch.equal(sd["norm.weight"], src.ln1.weight)
    sd["head.weight"], sd["head.bias"] = torch.randn(5, DIM), torch.randn(5)
    back = write_checkpoint(sd, tmp_path / "back.pth", "mmseg-mae")
    again = MAE(img_size=(64, 64), patch_size=PATCH, embed_dims=DIM, num_layers=DEPTH, num_heads=HEADS,
                norm_cfg=dict(type="LN", eps=1e-6), final_norm=True)
    again.load_state_dict(torch.load(back, weights_only=True)["state_dict"], strict=True)
    assert torch.equal(again.ln1.bias, src.ln1.bias)


def test_beit_q_and_v_biases_read_as_a_qkv_bias_with_a_zero_key_part(tmp_path):
    """MMSeg's ``BEiT`` (``qv_bias=True``) has no key bias: ours gets zeros there and equal outputs."""
    from mmseg.models.backbones import BEiT

    ref = BEiT(img_size=(64, 64), patch_size=PATCH, embed_dims=DIM, num_layers=DEPTH, num_heads=HEADS,
               out_indices=OUT, norm_cfg=dict(type="LN", eps=1e-6), init_values=0.2)
    randomize(ref, seed=3)
    ref.cls_token.data.normal_()  # BEiT has no absolute position embedding; a table per layer
    ref.eval()
    sd, meta = read_checkpoint(mmseg_file(ref, tmp_path / "beit.pth"), "mmseg")
    assert any("q_bias/v_bias" in n for n in meta["notes"])
    assert torch.equal(sd["blocks.1.attn.qkv.bias"][DIM:2 * DIM], torch.zeros(DIM))
    sd["pos_embed"] = torch.zeros(1, 17, DIM)  # BEiT adds none: ours with a zero table is the same
    model = ours((64, 64))
    model.vit.load_state_dict(sd, strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert_same_outputs(model(x), ref(x))


# --------------------------------------------------------------------------- loading at another size
def test_a_pretraining_checkpoint_resampled_as_mmseg_does(tmp_path):
    """A plain MAE encoder at its pretraining grid (7 x 7) loaded for 160 px (10 x 10): MMSeg's
    ``init_weights`` (``resize_abs_pos_embed``: bicubic, no anti-aliasing) and ours agree; the tables
    stay zero and the gammas at ``init_values`` on both sides."""
    plain = ours((112, 112), use_rel_pos=False, init_values=None)
    randomize(plain, seed=11)
    path = write_checkpoint(plain.vit.state_dict(), tmp_path / "pretrain_mmseg.pth", "mmseg-mae")
    ref = MAE(img_size=(160, 160), patch_size=PATCH, embed_dims=DIM, num_layers=DEPTH, num_heads=HEADS,
              out_indices=OUT, norm_cfg=dict(type="LN", eps=1e-6), init_values=1.0,
              init_cfg=dict(type="Pretrained", checkpoint=str(path)))
    ref.init_weights()
    model = ours((160, 160), pretrained=str(path))
    model.init_weights()
    report = model.load_report
    assert list(report.resampled) == ["pos_embed"] and "(1, 50, 32) -> (1, 101, 32)" in report.resampled["pos_embed"]
    assert sorted(set(k.split(".", 2)[-1] for k in report.missing)) == [
        "attn.relative_position_bias_table", "ls1.gamma", "ls2.gamma"]
    torch.testing.assert_close(model.vit.pos_embed, ref.pos_embed, rtol=0, atol=1e-6)
    x = torch.randn(1, 3, 160, 160)
    model.eval()
    ref.eval()
    with torch.no_grad():
        assert_same_outputs(model(x), ref(x))


# --------------------------------------------------------------------------- the CLI, the shipped config
def test_convert_round_trips_ours_and_mmseg_mae_through_the_cli(tmp_path, capsys):
    model = ours((96, 160), init_values=0.5)
    randomize(model, seed=5)
    src = save_checkpoint(model.vit, tmp_path / "ours.safetensors")
    assert cli(["convert", str(src), str(tmp_path / "mmseg.pth"), "--to", "mmseg-mae"]) == 0
    assert cli(["convert", str(tmp_path / "mmseg.pth"), str(tmp_path / "back.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "relative_position_index" in out  # the reader's note, printed
    back, meta = read_checkpoint(tmp_path / "back.safetensors")
    original = model.vit.state_dict()
    assert sorted(back) == sorted(original)
    for k in original:
        assert torch.equal(back[k], original[k]), k
    assert meta["source"].startswith("mmseg-mae:")


def test_writing_decomposed_tables_as_mmseg_mae_is_an_error(tmp_path):
    from mae_backbone.io import CheckpointError

    model = ours((64, 64), use_rel_pos="decomposed", init_values=None)
    with pytest.raises(CheckpointError, match=r"MMSeg MAE has no equivalent of 'blocks\.0\.attn\.rel_pos_h'"):
        write_checkpoint(model.vit.state_dict(), tmp_path / "x.pth", "mmseg-mae")


def test_the_shipped_b_config_builds_a_segmentor_with_the_beit_options(tiny_config):
    """The tiny config inherits the shipped ViT-B config and only shrinks it."""
    cfg = load_config(tiny_config)
    init_default_scope("mmseg")
    model = MODELS.build(cfg.model)
    vit = model.backbone.vit
    assert vit.rel_pos == "beit" and vit.init_values == 1.0
    assert vit.blocks[0].attn.relative_position_bias_table.shape == ((2 * 4 - 1) ** 2 + 3, TINY_VIT["num_heads"])
    assert torch.equal(vit.blocks[3].ls2.gamma, torch.ones(TINY_VIT["embed_dim"]))
    randomize(model.backbone, seed=2)
    from mmseg.structures import SegDataSample
    from mmengine.structures import PixelData

    sample = SegDataSample(gt_sem_seg=PixelData(data=torch.randint(0, 3, (1, 64, 64))),
                           metainfo=dict(img_shape=(64, 64), pad_shape=(64, 64)))
    losses = model.loss(torch.randn(2, 3, 64, 64), [sample, sample])
    total = sum(v for k, v in losses.items() if "loss" in k)
    total.backward()
    assert torch.isfinite(total)
    assert vit.blocks[1].attn.relative_position_bias_table.grad.abs().sum() > 0
    assert vit.blocks[1].ls1.gamma.grad.abs().sum() > 0
