"""The demo's figures (matplotlib, Agg): loss curves, example segmentations and detections, result bars."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    plt = _pyplot()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_curves(curves: dict[str, list[tuple[float, float]]], title: str, xlabel: str, path: Path) -> Path:
    """Training-loss curves on one set of axes, one line per label."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.2), dpi=100)
    for label, curve in curves.items():
        if curve:
            xs, ys = zip(*curve)
            ax.plot(xs, ys, marker="." if len(xs) < 60 else None, label=label)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("training loss")
    ax.grid(alpha=0.3)
    if len(curves) > 1:
        ax.legend()
    return _save(fig, path)


def palette(n: int) -> np.ndarray:
    """``n`` class colours, [n, 3] uint8 (tab10, repeating)."""
    cmap = _pyplot().get_cmap("tab10")
    return (np.array([cmap(i % 10)[:3] for i in range(n)]) * 255).astype(np.uint8)


def plot_segmentations(examples: dict[str, list[tuple[Path, np.ndarray]]], path: Path) -> Path:
    """Rows of image | ground truth | one column per label of ``examples`` (classes in fixed colours).

    Args:
        examples: label -> [(val image in the ADE layout, predicted label map [H, W])], the same
            images in the same order for every label.
    """
    from PIL import Image

    plt = _pyplot()
    labels = list(examples)
    rows = list(zip(*examples.values()))
    colours = palette(256)
    fig, axes = plt.subplots(len(rows), 2 + len(labels), figsize=(2 * (2 + len(labels)), 2.1 * len(rows)), dpi=100,
                             squeeze=False)
    for r, preds in enumerate(rows):
        image = preds[0][0]
        gt_path = image.parent.parent.parent / "annotations" / image.parent.name / (image.stem + ".png")
        gt = np.asarray(Image.open(gt_path)).astype(np.int64) - 1  # reduce_zero_label: raw 0 -> ignore
        panels = [np.asarray(Image.open(image).convert("RGB")), np.where(gt[..., None] >= 0, colours[gt.clip(0)], 0)]
        panels += [colours[pred] for _, pred in preds]
        for c, (panel, title) in enumerate(zip(panels, ["image", "ground truth", *labels])):
            axes[r, c].imshow(panel)
            axes[r, c].set_axis_off()
            if r == 0:
                axes[r, c].set_title(title, fontsize=10)
    return _save(fig, path)


def plot_detections(examples: dict[str, list[tuple[Path, np.ndarray]]], path: Path) -> Path:
    """Rows of one column per label of ``examples``: detections drawn on the same val images.

    Args:
        examples: label -> [(val image, drawn detections [H, W, 3] uint8)].
    """
    plt = _pyplot()
    labels = list(examples)
    rows = list(zip(*examples.values()))
    fig, axes = plt.subplots(len(rows), len(labels), figsize=(3 * len(labels), 3 * len(rows)), dpi=100,
                             squeeze=False)
    for r, drawn in enumerate(rows):
        for c, ((_, image), label) in enumerate(zip(drawn, labels)):
            axes[r, c].imshow(image)
            axes[r, c].set_axis_off()
            if r == 0:
                axes[r, c].set_title(label, fontsize=10)
    return _save(fig, path)


def plot_bars(groups: Sequence[tuple[str, dict[str, float]]], title: str, path: Path,
              errors: Sequence[dict[str, float]] | None = None) -> Path | None:
    """Grouped bars: one group per (label, {series: value}), with ``errors`` (one {series: value}
    per group) as whiskers; None when there is nothing to draw."""
    if not groups:
        return None
    plt = _pyplot()
    series = list(dict.fromkeys(s for _, values in groups for s in values))
    width = 0.76 / len(series)
    fig, ax = plt.subplots(figsize=(7, 3.2), dpi=100)
    x = np.arange(len(groups))
    for k, name in enumerate(series):
        whiskers = [e.get(name, 0.0) for e in errors] if errors else None
        ax.bar(x + (k - (len(series) - 1) / 2) * width, [values.get(name, 0.0) for _, values in groups], width,
               yerr=whiskers, capsize=3 if whiskers else 0, label=name)
    ax.set_xticks(x, [label for label, _ in groups], fontsize=8)
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
    return _save(fig, path)
