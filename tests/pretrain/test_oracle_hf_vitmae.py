"""Our MAE against an independent implementation: Hugging Face ``transformers.ViTMAEForPreTraining``.

Tiny on both sides (32 px images, 8 px patches: a 4x4 grid; encoder 64 wide x 2 blocks x 4 heads;
decoder 32 wide x 2 blocks x 4 heads; mask ratio 0.75), HF's weights all random (LayerNorm affine
parameters, biases, class and mask tokens), saved with ``save_pretrained`` and read into ours
through our ``hf`` reader (the encoder) and the decoder's key map below. The position
embeddings are the fixed sin-cos tables on both sides and are *not* copied: ours must equal the
ones HF's code computes. The same ``noise`` gives the same mask, predictions and loss, for the
norm-pixel and the plain pixel target.

The norm-pixel target: HF (``forward_loss``), the official MAE ``models_mae.py`` and ours all
normalize a patch by ``(var + 1e-6) ** 0.5`` with the unbiased variance; one image of the batch is
almost flat (per-patch variance ~1e-6), where the place of the epsilon matters.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mae_backbone.checkpoint import read_checkpoint
from mae_backbone.formats import read_hf
from pretrain import MaskedAutoencoderViT

import transformers  # the oracle; set-up installs it (dev extra): a missing one must fail, not skip

IMG, PATCH, DIM, DEPTH, HEADS = 32, 8, 64, 2, 4
DEC_DIM, DEC_DEPTH, DEC_HEADS = 32, 2, 4
MASK_RATIO = 0.75
FIXED = ("vit.embeddings.position_embeddings", "decoder.decoder_pos_embed")


def hf_mae(norm_pix: bool) -> torch.nn.Module:
    cfg = transformers.ViTMAEConfig(
        hidden_size=DIM, num_hidden_layers=DEPTH, num_attention_heads=HEADS, intermediate_size=4 * DIM,
        decoder_hidden_size=DEC_DIM, decoder_num_hidden_layers=DEC_DEPTH, decoder_num_attention_heads=DEC_HEADS,
        decoder_intermediate_size=4 * DEC_DIM, image_size=IMG, patch_size=PATCH, num_channels=3, qkv_bias=True,
        mask_ratio=MASK_RATIO, norm_pix_loss=norm_pix, layer_norm_eps=1e-6, hidden_act="gelu",
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = transformers.ViTMAEForPreTraining(cfg).eval()
    # transformers 5.24 leaves both fixed sin-cos tables at zero when built from a config (its
    # _init_weights skips the encoder's table and zeroes the decoder's); HF's own table code fills them
    embeddings = model.vit.embeddings
    embeddings.patch_embeddings.projection._is_hf_initialized = False
    embeddings.initialize_weights()
    model.decoder.initialize_weights(embeddings.patch_embeddings.num_patches)
    assert embeddings.position_embeddings.abs().max() > 0.5 and model.decoder.decoder_pos_embed.abs().max() > 0.5
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in FIXED:
                continue
            noise = torch.randn(p.shape, generator=gen)
            is_norm_weight = name.endswith(".weight") and ("layernorm" in name or "decoder_norm" in name)
            p.copy_(1.0 + 0.2 * noise if is_norm_weight else 0.1 * noise)
    return model


def our_mae(target: str) -> MaskedAutoencoderViT:
    return MaskedAutoencoderViT(
        encoder="vit_tiny_patch16", img_size=IMG, patch_size=PATCH, embed_dim=DIM, depth=DEPTH, num_heads=HEADS,
        decoder_embed_dim=DEC_DIM, decoder_depth=DEC_DEPTH, decoder_num_heads=DEC_HEADS, target=target).eval()


def hf_to_ours(model: torch.nn.Module, folder: Path) -> dict[str, torch.Tensor]:
    """HF ViTMAEForPreTraining -> our MAE keys, through the files ``save_pretrained`` writes (the
    layout users download); position embeddings are left out (fixed tables)."""
    model.save_pretrained(folder)
    out, meta = read_checkpoint(folder)  # the encoder, through our "hf" reader
    assert meta["format"] == "hf" and any("decoder" in note for note in meta["notes"])
    saved = {k: v for k, v in load_file(str(folder / "model.safetensors")).items() if k not in FIXED}
    out = {k: v for k, v in out.items() if k != "pos_embed"}
    layers = {}
    for k, v in saved.items():
        # the hub's files name the decoder's blocks decoder.decoder_layers.N; transformers 5's
        # save_pretrained writes decoder.decoder_encoder.layer.N (its legacy renaming applied twice)
        m = re.match(r"^decoder\.decoder_(?:layers|encoder\.layer)\.(\d+)\.(.+)$", k)
        if m:
            layers[f"encoder.layer.{m.group(1)}.{m.group(2)}"] = v
        elif k.startswith("decoder."):
            out[k[len("decoder."):]] = v  # decoder_embed, mask_token, decoder_norm, decoder_pred
    notes: list[str] = []
    for k, v in read_hf(layers, notes).items():  # the decoder's blocks have the encoder's layout
        out["decoder_" + k] = v
    assert not notes and len(layers) == 16 * DEC_DEPTH
    return out


def test_fixed_position_embeddings_are_hf_s():
    hf, ours = hf_mae(True), our_mae("norm_pixel")
    torch.testing.assert_close(ours.pos_embed, hf.vit.embeddings.position_embeddings, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours.decoder_pos_embed, hf.decoder.decoder_pos_embed, rtol=0, atol=1e-6)


@pytest.mark.parametrize("norm_pix,target", [(True, "norm_pixel"), (False, "pixel")])
def test_loss_predictions_and_mask_equal_hf(tmp_path, norm_pix, target):
    hf, ours = hf_mae(norm_pix), our_mae(target)
    missing, unexpected = ours.load_state_dict(hf_to_ours(hf, tmp_path / "hf"), strict=False)
    assert sorted(missing) == ["decoder_pos_embed", "pos_embed"] and not unexpected
    gen = torch.Generator().manual_seed(1)
    imgs = torch.randn(3, 3, IMG, IMG, generator=gen)
    imgs[2] = 0.3 + 1e-3 * imgs[2]  # nearly flat: per-patch variance ~1e-6, the epsilon's scale
    noise = torch.rand(3, (IMG // PATCH) ** 2, generator=gen)
    with torch.no_grad():
        want = hf(pixel_values=imgs, noise=noise)
        loss, pred, mask = ours(imgs, mask_ratio=MASK_RATIO, noise=noise)
    assert torch.equal(mask, want.mask)
    assert mask.sum().item() == 3 * 12  # int(16 * 0.25) = 4 kept of 16
    torch.testing.assert_close(pred, want.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss, want.loss, rtol=1e-5, atol=1e-6)


def test_epsilon_placement_matters_on_the_flat_image():
    """Guard for the test above: on the nearly flat image the official ``(var + 1e-6) ** .5`` and
    the other common placement ``var ** .5 + 1e-6`` give clearly different targets."""
    ours = our_mae("norm_pixel")
    gen = torch.Generator().manual_seed(1)
    img = 0.3 + 1e-3 * torch.randn(1, 3, IMG, IMG, generator=gen)
    patches = ours.patchify(img)
    mean, var = patches.mean(-1, keepdim=True), patches.var(-1, keepdim=True)
    official = (patches - mean) / (var + 1e-6) ** 0.5
    other = (patches - mean) / (var**0.5 + 1e-6)
    torch.testing.assert_close(ours.patch_target(img), official, rtol=1e-6, atol=1e-6)
    assert (official - other).abs().max() > 0.1


def test_transformers_5_in_memory_names_read_like_the_saved_ones(tmp_path):
    """``torch.save(model.state_dict())`` under transformers 5 (``layers.N.attention.q_proj`` ...)
    reads to the same tensors as its ``save_pretrained`` files (``encoder.layer.N....query``)."""
    hf = hf_mae(True)
    in_memory = hf.state_dict()
    assert any(".attention.q_proj." in k for k in in_memory)
    from_memory = read_hf(in_memory, [])
    hf.save_pretrained(tmp_path / "hf")
    from_files, _ = read_checkpoint(tmp_path / "hf")
    assert sorted(from_memory) == sorted(from_files)
    for k, v in from_files.items():
        assert torch.equal(from_memory[k], v), k
