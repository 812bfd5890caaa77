"""Our detection ViT against an independent implementation: Hugging Face ``transformers.VitDetModel``.

Both are built tiny (64 wide, 4 blocks, 4 heads, patch 16, windows of 4 patches in blocks 0 and 2,
global attention in 1 and 3, decomposed relative positions, an absolute table at the pretraining
size 64 px = 4x4 + the class token's slot) with random weights everywhere (relative tables, the
absolute table, LayerNorm affine parameters, biases). Inputs of 96, 112 and 128 px need the
absolute table interpolated (4x4 -> 6x6 / 7x7 / 8x8), windows padded (6 and 7 are not multiples of
4), and the global blocks' relative tables (made for 128 px: 2*8-1 entries) interpolated to 11 / 13.
The ViT is prepared as the detection backbone prepares it (``detection.backbone.prepare_vit``) and
its last map must equal VitDet's ``last_hidden_state`` (fp32, <= 1e-5 relative), in both directions
of the weight conversion (``mae_backbone.formats``' ``hf-vitdet`` reader and writer).
"""
from __future__ import annotations

import pytest
import torch

from mae_backbone import create_vit, save_checkpoint
from mae_backbone.formats import read_hf_vitdet, write_hf_vitdet
from mae_backbone.io import safe_torch_load
from mae_backbone.layers import set_rel_pos_impl
from mae_transfer.cli import main as cli

import transformers  # the oracle; set-up installs it (dev extra): a missing one must fail, not skip

DIM, DEPTH, HEADS, PATCH, WINDOW = 64, 4, 4, 16, 4
GLOBAL = (1, 3)
IMG, PRETRAIN = 128, 64


def vitdet_config(img_size: int = IMG, **extra):
    return transformers.VitDetConfig(
        hidden_size=DIM, num_hidden_layers=DEPTH, num_attention_heads=HEADS, mlp_ratio=4, patch_size=PATCH,
        image_size=img_size, pretrain_image_size=PRETRAIN, window_size=WINDOW,
        window_block_indices=[i for i in range(DEPTH) if i not in GLOBAL], residual_block_indices=[],
        use_relative_position_embeddings=True, use_absolute_position_embeddings=True, qkv_bias=True,
        layer_norm_eps=1e-6, hidden_act="gelu", drop_path_rate=0.0, dropout_prob=0.0, **extra)


def hf_vitdet(img_size: int = IMG) -> torch.nn.Module:
    return transformers.VitDetModel(vitdet_config(img_size)).eval()


def our_vit(img_size: int = IMG) -> torch.nn.Module:
    from detection.backbone import prepare_vit

    vit = create_vit("vit_tiny_patch16", embed_dim=DIM, depth=DEPTH, num_heads=HEADS, patch_size=PATCH,
                     img_size=img_size, pretrain_img_size=PRETRAIN, window_size=WINDOW, global_blocks=GLOBAL,
                     rel_pos=True, dense_cls=False)
    return prepare_vit(vit).eval()


def randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Every parameter random: tables, norms (around 1), biases, position embeddings."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.3 * noise)
            elif "rel_pos" in name:
                p.copy_(0.5 * noise)  # strong enough that a wrong bias shows at 1e-5
            else:
                p.copy_(0.1 * noise)


def last_map(ours: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return ours.forward_intermediates(x, [DEPTH - 1])[0]


def assert_close_rel(got: torch.Tensor, want: torch.Tensor, tol: float = 1e-5) -> None:
    assert got.shape == want.shape
    err = ((got - want).abs().max() / want.abs().max()).item()
    assert err <= tol, f"max error {err:.2e} of the largest value (tolerance {tol:g})"


@pytest.mark.parametrize("size", [96, 112, 128])
@pytest.mark.parametrize("impl", ["fused", "mask"])
def test_our_weights_in_vitdet_give_our_last_map(size, impl):
    """ours -> hf-vitdet writer -> VitDetModel (strict): the same last map."""
    torch.manual_seed(0)
    ours = our_vit()
    randomize(ours)
    set_rel_pos_impl(ours, impl)
    hf = hf_vitdet()
    hf.load_state_dict(write_hf_vitdet(ours.state_dict(), {}), strict=True)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        assert_close_rel(last_map(ours, x), hf(x).last_hidden_state)


@pytest.mark.parametrize("size", [96, 112])
def test_vitdet_weights_in_ours_give_vitdet_last_map(size):
    """VitDetModel (random) -> hf-vitdet reader -> our prepared ViT (strict): the same last map.

    Also at another configured size (``image_size`` 96: global tables of 2*6-1 entries) than the
    input (112), and a non-square input, so the tables are interpolated on both sides.
    """
    hf = hf_vitdet(img_size=96)
    randomize(hf, seed=1)
    notes: list[str] = []
    sd = read_hf_vitdet(hf.state_dict(), notes)
    assert not notes
    ours = our_vit(img_size=96)
    assert ours.blocks[1].attn.rel_pos_h.shape == hf.encoder.layer[1].attention.rel_pos_h.shape == (11, DIM // HEADS)
    assert ours.blocks[0].attn.rel_pos_h.shape == (2 * WINDOW - 1, DIM // HEADS)
    assert ours.pos_embed.shape == hf.embeddings.position_embeddings.shape == (1, 1 + 4 * 4, DIM)
    ours.load_state_dict(sd, strict=True)
    for x in (torch.randn(1, 3, size, size), torch.randn(1, 3, size, 80)):
        with torch.no_grad():
            assert_close_rel(last_map(ours, x), hf(x).last_hidden_state)


def test_vitdet_backbone_feature_map_is_the_same():
    """``VitDetBackbone`` (the variant a detector wraps) gives the same last stage as the model."""
    backbone = transformers.VitDetBackbone(vitdet_config(out_features=[f"stage{DEPTH}"])).eval()
    randomize(backbone, seed=2)
    ours = our_vit()
    ours.load_state_dict(read_hf_vitdet(backbone.state_dict(), []), strict=True)
    x = torch.randn(1, 3, 112, 112)
    with torch.no_grad():
        assert_close_rel(last_map(ours, x), backbone(x).feature_maps[-1])


def test_a_wrong_relative_bias_would_show():
    """The comparison is sensitive: zeroing one block's rel-pos table moves the output past 1e-5."""
    ours = our_vit()
    randomize(ours)
    hf = hf_vitdet()
    sd = write_hf_vitdet(ours.state_dict(), {})
    sd["encoder.layer.3.attention.rel_pos_w"] = torch.zeros_like(sd["encoder.layer.3.attention.rel_pos_w"])
    hf.load_state_dict(sd, strict=True)
    x = torch.randn(1, 3, 112, 112)
    with torch.no_grad():
        got, want = last_map(ours, x), hf(x).last_hidden_state
    assert ((got - want).abs().max() / want.abs().max()).item() > 1e-3



def test_a_converted_file_loads_into_vitdet_strictly(tmp_path, capsys):
    """``mae-transfer convert --to hf-vitdet``: the file loads into ``VitDetModel`` with strict=True
    and gives our map; the class token and the final norm it cannot carry are named."""
    vit = create_vit("vit_tiny_patch16", embed_dim=DIM, depth=DEPTH, num_heads=HEADS, patch_size=PATCH,
                     img_size=IMG, pretrain_img_size=PRETRAIN, window_size=WINDOW, global_blocks=GLOBAL,
                     rel_pos=True)
    randomize(vit)
    save_checkpoint(vit, tmp_path / "ours.safetensors")
    assert cli(["convert", str(tmp_path / "ours.safetensors"), str(tmp_path / "vitdet.pth"), "--to", "hf-vitdet"]) == 0
    assert "cls_token, norm.bias, norm.weight" in capsys.readouterr().out
    hf = hf_vitdet()
    hf.load_state_dict(safe_torch_load(tmp_path / "vitdet.pth"), strict=True)
    ours = our_vit()
    ours.load_state_dict({k: v for k, v in vit.state_dict().items() if k not in ("cls_token", "norm.weight",
                                                                                 "norm.bias")}, strict=True)
    x = torch.randn(1, 3, 112, 96)
    with torch.no_grad():
        assert_close_rel(last_map(ours, x), hf(x).last_hidden_state)


def test_a_vitdet_model_folder_reads_as_hf_vitdet(tmp_path):
    """``save_pretrained`` output (a folder, read as ``hf`` by default) is recognized as VitDet."""
    from mae_backbone.checkpoint import read_checkpoint

    hf = hf_vitdet()
    randomize(hf, seed=3)
    hf.save_pretrained(tmp_path / "vitdet")
    sd, meta = read_checkpoint(tmp_path / "vitdet")
    assert any("read as 'hf-vitdet'" in note for note in meta["notes"])
    ours = our_vit()
    ours.load_state_dict(sd, strict=True)
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        assert_close_rel(last_map(ours, x), hf(x).last_hidden_state)
