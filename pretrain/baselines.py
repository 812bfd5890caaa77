"""One call that pretrains a backbone by any method on an image set, with a given budget:
``pretrain_backbone("mae" | "mocov3" | "supervised", data, out, epochs=..., batch_size=...)``.

Every method gets the same encoder, image size, epochs, batch, warmup (a tenth of the epochs, at
least one) and seed, and otherwise its own published recipe: MAE's (``pretrain.config``
defaults), MoCo v3's (``pretrain.moco``: wd 0.1, tau 0.2, m0 0.99, 4096-wide heads) and the
DeiT-style supervised one (``pretrain.supervised``).  ``options`` changes any other option of
``mae-transfer pretrain`` (e.g. a lighter MAE decoder, a learning rate fitted to a tiny budget).
The result is an encoder file in the ``mae_backbone`` format whose metadata names the method.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Mapping

from pretrain.config import METHODS, make_config
from pretrain.model import MAE_ARCHS

# what pretrain_backbone sets itself; ``options`` may not change it
_BUDGET = ("method", "data", "output", "model", "model_kwargs", "img_size", "epochs", "batch_size", "seed")


def data_folder(method: str, data: str | Path) -> Path:
    """The images a method reads from an ImageNet-style root: ``data/train`` for the
    self-supervised methods when it exists (else ``data``), the root itself for ``supervised``
    (which finds ``train/`` and ``val/`` in it)."""
    root = Path(data)
    if method != "supervised" and (root / "train").is_dir():
        return root / "train"
    return root


def pretrain_backbone(
    method: str,
    data: str | Path,
    out: str | Path,
    *,
    encoder: str = "vit_tiny_patch16",
    encoder_kwargs: dict | None = None,
    img_size: int = 64,
    epochs: int,
    batch_size: int,
    seed: int = 0,
    log: Callable[[str], Any] = print,
    options: Mapping[str, Any] | None = None,
) -> Path:
    """Pretrain an ``encoder`` by ``method`` on ``data`` into the run folder ``out``.

    Args:
        method: ``mae``, ``mocov3`` or ``supervised``.
        data: an ImageNet-style root with ``train/`` (and ``val/``) class folders, as
            ``mae-transfer data sample`` writes under ``classification/``; the self-supervised
            methods read ``train/`` only, without its labels.
        out: the run folder (re-running resumes from its checkpoint).
        encoder: a ``mae_backbone.VIT_ARCHS`` name; ``encoder_kwargs`` its overrides (depth, patch_size, ...).
        img_size, epochs, batch_size, seed: the budget, the same for every method.
        log: receives one line when the run starts and one when it ends.
        options: further ``mae-transfer pretrain`` options (not the budget above).
    Returns:
        the encoder checkpoint (``out/encoder.safetensors``), readable by ``mae_backbone.read_checkpoint``.
    Raises:
        ValueError: unknown method, encoder or option.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    model = "mae_" + encoder
    if model not in MAE_ARCHS:
        known = ", ".join(a.removeprefix("mae_") for a in MAE_ARCHS)
        raise ValueError(f"unknown encoder {encoder!r}; known: {known}")
    extra = dict(options or {})
    fixed = sorted(set(k.replace("-", "_") for k in extra) & set(_BUDGET))
    if fixed:
        raise ValueError(f"options: {', '.join(fixed)} are pretrain_backbone's own arguments")
    values: dict[str, Any] = dict(
        warmup_epochs=max(1, epochs // 10), num_workers=0, progress=False, tensorboard=False,
        save_every=max(1, epochs), log_every=50,
    )
    if method == "mae":
        values.update(vis_every=max(1, epochs), vis_images=4)
    values.update(extra)
    values.update(method=method, data=str(data_folder(method, data)), output=str(out), model=model,
                  model_kwargs=dict(encoder_kwargs or {}), img_size=img_size, epochs=epochs, batch_size=batch_size,
                  seed=seed)
    from pretrain.train import train

    cfg = make_config(values)
    log(f"pretrain {method}: {encoder} {dict(encoder_kwargs or {})} at {img_size} px, {epochs} epochs, "
        f"batch {batch_size}, seed {seed} -> {out}")
    start = time.perf_counter()
    result = train(cfg)
    if result.encoder is None:
        raise RuntimeError(f"pretrain {method}: the run in {out} wrote no encoder")
    losses = [r.get("loss", r.get("train_loss")) for r in result.history]
    shown = f", loss {losses[0]:.4f} -> {losses[-1]:.4f}" if losses and None not in losses else ""
    log(f"pretrain {method}: {result.epochs_done} epochs in {time.perf_counter() - start:.0f} s{shown}; "
        f"encoder {result.encoder}")
    return Path(result.encoder)
