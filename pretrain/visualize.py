"""Reconstruction figures: original / masked / reconstruction / reconstruction + visible patches.

A norm-pixel model predicts each patch normalized by its own mean and std; its reconstruction is
shown after de-normalizing every patch with the statistics of the true patch (as the official
demo does), and the figure says so under the panels.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from PIL import Image, ImageDraw, ImageFont

from mae_backbone import VIT_ARCHS, CheckpointError, atomic_write, safe_torch_load
from pretrain.data import build_transform
from pretrain.masking import mask_noise
from pretrain.model import DECODER_DEFAULTS, MaskedAutoencoderViT
from training.data import IMAGENET_MEAN, IMAGENET_STD, mix_seed, read_image
from training.state import load_model_strict

PANEL_TITLES = ("original", "masked", "reconstruction", "reconstruction + visible")
NORM_PIX_NOTE = ("norm-pixel model: each reconstructed patch is de-normalized with the true patch's "
                 "mean and std")


@dataclass
class Reconstruction:
    """Images in display space ([0, 1] RGB), each [N, 3, H, W]; ``mask`` [N, L] with 1 = removed."""

    original: torch.Tensor
    masked: torch.Tensor
    reconstruction: torch.Tensor
    pasted: torch.Tensor
    mask: torch.Tensor
    loss: float
    denormalized_by_patch: bool

    def panels(self) -> list[torch.Tensor]:
        return [self.original, self.masked, self.reconstruction, self.pasted]


def to_display(x: torch.Tensor) -> torch.Tensor:
    """ImageNet-normalized [N, 3, H, W] -> RGB in [0, 1]."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x * std + mean).clamp(0, 1)


@torch.no_grad()
def reconstruct(
    model: MaskedAutoencoderViT, imgs: torch.Tensor, mask_ratio: float = 0.75, noise: torch.Tensor | None = None
) -> Reconstruction:
    """Run the model and assemble the four panels.

    Args:
        model: the MAE (set to eval mode here).
        imgs: [N, 3, H, W] ImageNet-normalized, at the model's image size.
        mask_ratio: fraction removed.
        noise: [N, L] to fix the masks.
    """
    model.eval()
    imgs = imgs.to(next(model.parameters()).device).float()
    loss, pred, mask = model(imgs, mask_ratio, noise=noise)
    pred = pred.float()
    by_patch = model.target == "norm_pixel"
    if by_patch:  # undo the per-patch normalization with each true patch's statistics
        patches = model.patchify(imgs)
        mean = patches.mean(dim=-1, keepdim=True)
        var = patches.var(dim=-1, keepdim=True)
        pred = pred * (var + 1.0e-6) ** 0.5 + mean
    recon = model.unpatchify(pred)
    m = model.unpatchify(mask.unsqueeze(-1).expand(-1, -1, pred.shape[-1]))  # 1 = removed
    return Reconstruction(
        original=to_display(imgs).cpu(),
        masked=to_display(imgs * (1 - m)).cpu(),
        reconstruction=to_display(recon).cpu(),
        pasted=to_display(imgs * (1 - m) + recon * m).cpu(),
        mask=mask.cpu(),
        loss=float(loss),
        denormalized_by_patch=by_patch,
    )


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def render_figure(rec: Reconstruction, title: str | None = None, scale: int = 1) -> Image.Image:
    """One row per image, one column per panel, titles on top and the de-normalization note below."""
    n, _, h, w = rec.original.shape
    font = _font(14)
    widest = max(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(t, font=font) for t in PANEL_TITLES)
    scale = max(1, scale, math.ceil((widest + 4) / w))  # panels at least as wide as their titles
    ph, pw, pad = h * scale, w * scale, 6
    header = 22 + (20 if title else 0)
    notes = [NORM_PIX_NOTE] if rec.denormalized_by_patch else []
    footer = 8 + 18 * len(notes)
    canvas = Image.new("RGB", (4 * pw + 5 * pad, header + n * (ph + pad) + footer), "white")
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((pad, 4), title, fill="black", font=font)
    for j, name in enumerate(PANEL_TITLES):
        draw.text((pad + j * (pw + pad), header - 18), name, fill="black", font=font)
    for i in range(n):
        for j, panel in enumerate(rec.panels()):
            arr = (panel[i].permute(1, 2, 0).numpy() * 255).round().astype("uint8")
            tile = Image.fromarray(arr)
            if scale > 1:
                tile = tile.resize((pw, ph), Image.NEAREST)
            canvas.paste(tile, (pad + j * (pw + pad), header + i * (ph + pad)))
    for k, note in enumerate(notes):
        draw.text((pad, header + n * (ph + pad) + 2 + 18 * k), note, fill="black", font=font)
    return canvas


def save_figure(fig: Image.Image, rec: Reconstruction, path: str | Path, title: str | None = None) -> Path:
    """Write the figure as PNG (atomically) with its title and notes in the ``Description`` text chunk."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    text = [title] if title else []
    if rec.denormalized_by_patch:
        text.append(NORM_PIX_NOTE)
    info.add_text("Description", "\n".join(text) or "MAE reconstruction")
    return atomic_write(path, lambda tmp: fig.save(tmp, format="PNG", pnginfo=info))


def load_images(paths: Sequence[str | Path], img_size: int) -> torch.Tensor:
    """Files -> [N, 3, S, S] ImageNet-normalized (short side resized to S, center crop).

    Raises:
        DataError: a file is missing or cannot be decoded (truncated, not an image, a decompression
            bomb); the message names it.
    """
    transform = build_transform("none", img_size)
    return torch.stack([transform(read_image(p)) for p in paths])


def infer_mae_config(sd: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """``MaskedAutoencoderViT`` arguments read from an official-layout state dict.

    Head counts are not in the weights: the encoder's come from the matching registered size,
    the decoder's default to 16 (the official value).
    """
    from mae_backbone.checkpoint import infer_arch

    facts = infer_arch(sd)
    if "arch" not in facts:
        raise CheckpointError(
            f"the encoder (width {facts.get('embed_dim')}, depth {facts.get('depth')}, patch "
            f"{facts.get('patch_size')}) matches no registered size ({', '.join(VIT_ARCHS)})"
        )
    if "decoder_embed.weight" not in sd:
        raise CheckpointError("the checkpoint has no decoder (an encoder-only export?); "
                              "a reconstruction needs the full pretraining checkpoint")
    depth = len({k.split(".")[1] for k in sd if k.startswith("decoder_blocks.")})
    cfg: dict[str, Any] = dict(
        encoder=facts["arch"],
        decoder_embed_dim=int(sd["decoder_embed.weight"].shape[0]),
        decoder_depth=depth,
        decoder_num_heads=DECODER_DEFAULTS["decoder_num_heads"],
        encoder_mask_tokens="encoder_mask_token" in sd,
        img_size=int(facts["img_size"][0]),
    )
    if facts.get("in_chans", 3) != 3:
        cfg["in_chans"] = facts["in_chans"]
    return cfg


def load_mae(path: str | Path, target: str | None = None) -> tuple[MaskedAutoencoderViT, str]:
    """A full MAE (encoder + decoder) from our checkpoint or an official ``{"model": sd}`` file.

    Args:
        path: the checkpoint.
        target: ``pixel`` / ``norm_pixel`` to override; default: the run's setting from our
            checkpoint, ``pixel`` for a file that does not say (official visualization models).
    Returns:
        (model in eval mode, a note on where the target setting came from).
    """
    obj = safe_torch_load(path)
    sd = obj.get("model") if isinstance(obj, dict) and isinstance(obj.get("model"), dict) else obj
    if not isinstance(sd, dict) or "patch_embed.proj.weight" not in sd:
        raise CheckpointError(f"{path}: not an MAE checkpoint (no 'model' state dict with patch_embed)")
    stored = obj.get("model_config") if isinstance(obj, dict) else None
    try:
        cfg = dict(stored) if stored else infer_mae_config(sd)
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    cfg.pop("grad_checkpointing", None)
    if target is not None:
        cfg["target"] = target
        how = "target given on the command line"
    elif stored:
        how = "target from the run's configuration"
    else:
        cfg["target"] = "pixel"
        how = "target not recorded in the file; assumed pixel (pass --target norm_pixel to change)"
    model = MaskedAutoencoderViT(**cfg)
    load_model_strict(model, sd, str(path))
    return model.eval(), how


def visualize(
    checkpoint: str | Path,
    images: Sequence[str | Path],
    output: str | Path,
    mask_ratio: float = 0.75,
    seed: int = 0,
    target: str | None = None,
    masking: str | None = None,
) -> tuple[Path, Reconstruction]:
    """Write the reconstruction figure of ``images`` by ``checkpoint`` to ``output`` (PNG)."""
    model, how = load_mae(checkpoint, target)
    if masking:
        model.masking = masking
    imgs = load_images(images, model.img_size[0])
    noise = mask_noise(model.masking, model.grid_size, mask_ratio, seeds=[mix_seed(seed, i) for i in range(len(imgs))])
    rec = reconstruct(model, imgs, mask_ratio, noise)
    title = f"{Path(checkpoint).name}: mask {mask_ratio:g} ({model.masking}), {how}, loss {rec.loss:.4f}"
    out = save_figure(render_figure(rec, title, scale=max(1, 192 // model.img_size[0])), rec, output, title)
    return out, rec
