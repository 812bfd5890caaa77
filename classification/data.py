"""Classification data: ImageNet-style class folders, the recipes' transforms (timm), mixup.

Layout: ``root/<class>/<image>`` (torchvision ``ImageFolder``'s; classes are the sorted folder
names).  The validation folder must hold exactly the training folder's classes
(``check_same_classes``), else the labels would silently mean different things.

Reproducibility (as in pretraining): the training order of an epoch comes from
``training.data.EpochBatchSampler`` (a pure function of ``(seed, epoch)``), and each sample's
augmentation runs with python ``random``, numpy and torch seeded from ``(seed, epoch, index)``
(timm's RandAugment, crop and erasing use all three), so it does not depend on which worker
process loads it.  Mixup / cutmix (numpy) and drop path (torch) run in the training process,
whose generators are re-seeded at every epoch start.

Unreadable images: skipped with a warning naming the file and counted (as in pretraining); a
class folder without a single image file is an error.
"""
from __future__ import annotations

import contextlib
import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset

from training.data import IMAGENET_MEAN, IMAGENET_STD, IMG_EXTENSIONS, DataError, image_files, load_rgb

Transform = Callable[[Image.Image], torch.Tensor]
logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------- folders
def find_classes(root: str | Path) -> list[str]:
    """The class names of a class folder: its sorted sub-folder names (a symlink back to the folder
    itself, or to one that holds it, is a cycle and not a class: skipped with a warning).

    Raises:
        DataError: the folder does not exist or has no sub-folder.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: no such folder (expected one sub-folder per class)")
    real_root = Path(os.path.realpath(root))
    classes, loops = [], []
    for d in sorted(root.iterdir()):
        if d.is_dir() and not d.name.startswith("."):
            real = Path(os.path.realpath(d))
            # a link back to the folder (or one that holds it) is a cycle, not a class
            (loops if real == real_root or real in real_root.parents else classes).append(d.name)
    if loops:
        logger.warning("%s: not classes, links back to the folder itself (symlink cycles): %s", root, _abbrev(loops))
    if not classes:
        raise DataError(f"{root}: no class sub-folders (expected root/<class>/<image>)")
    return classes


def check_same_classes(train: Sequence[str], val: Sequence[str], train_root: Any = "train",
                       val_root: Any = "val") -> None:
    """Raise ``DataError`` listing the classes found in only one of the two folders."""
    only_train = sorted(set(train) - set(val))
    only_val = sorted(set(val) - set(train))
    if only_train or only_val:
        parts = []
        if only_train:
            parts.append(f"only in {train_root}: {_abbrev(only_train)}")
        if only_val:
            parts.append(f"only in {val_root}: {_abbrev(only_val)}")
        raise DataError(f"the training and validation folders have different classes ({len(train)} vs "
                        f"{len(val)}); " + "; ".join(parts))


def _abbrev(items: Sequence[str], n: int = 20) -> str:
    return ", ".join(items[:n]) + (f", ... ({len(items)} in all)" if len(items) > n else "")


def list_samples(root: str | Path, classes: Sequence[str]) -> list[tuple[Path, int]]:
    """``(file, class index)`` for every image file under ``root/<class>/`` (``training.data.image_files``:
    recursive, sorted, symlinked folders followed once, each real file once per class).

    Raises:
        DataError: a class folder holds no image file.
    """
    root = Path(root)
    samples: list[tuple[Path, int]] = []
    empty = []
    for target, name in enumerate(classes):
        files = sorted(image_files(root / name))
        if not files:
            empty.append(name)
        samples.extend((p, target) for p in files)
    if empty:
        raise DataError(f"{root}: class folders without image files ({', '.join(IMG_EXTENSIONS)}): {_abbrev(empty)}")
    return samples


# --------------------------------------------------------------------------- transforms
def build_transform(cfg: Any, is_training: bool) -> Transform:
    """The protocol's transform, from timm (ImageNet mean/std, bicubic).

    - fine-tuning, training: RandomResizedCrop + flip + RandAugment (``cfg.aa``) + random erasing
      (``cfg.reprob``, ``cfg.remode``), no colour jitter (the official MAE ``build_transform``);
    - linear probe, training: RandomResizedCrop + flip;
    - evaluation: resize to ``img_size / crop_pct`` (256 for 224), center crop.

    RandomResizedCrop keeps ``cfg.crop_scale`` to 100% of the area (recipe: 8%).
    """
    from timm.data import create_transform

    common = dict(input_size=cfg.img_size, interpolation="bicubic", mean=IMAGENET_MEAN, std=IMAGENET_STD)
    if not is_training:
        return create_transform(is_training=False, crop_pct=cfg.crop_pct, **common)
    crop = dict(scale=(cfg.crop_scale, 1.0))
    if cfg.protocol == "linprobe":
        return create_transform(is_training=True, color_jitter=None, **crop, **common)
    aa = None if str(cfg.aa).lower() in ("", "none") else cfg.aa
    transform = create_transform(is_training=True, color_jitter=None, auto_augment=aa, re_prob=cfg.reprob,
                                 re_mode=cfg.remode, re_count=cfg.recount, **crop, **common)
    return _pillow13_safe_posterize(transform)


def _posterize(img: Image.Image, bits_to_keep: int, **_: Any) -> Image.Image:
    """timm's posterize, but defined for 0 bits as Pillow < 13 did (every channel to 0).

    timm's ``PosterizeIncreasing`` (the ``inc1`` RandAugment of the MAE recipe) asks for 0 bits at
    high magnitudes; Pillow 13 raises ``ValueError`` there where older Pillow returned a black image.
    """
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return img.point([0] * 256 * len(img.getbands()))
    return ImageOps.posterize(img, bits_to_keep)


def _pillow13_safe_posterize(transform: Transform) -> Transform:
    """Swap timm's posterize in any RandAugment/AutoAugment ops of ``transform`` for ``_posterize``."""
    for t in getattr(transform, "transforms", []):
        for op in getattr(t, "ops", []):
            if str(getattr(op, "name", "")).startswith("Posterize"):
                op.aug_fn = _posterize
    return transform


@contextlib.contextmanager
def seeded_rngs(seed: int) -> Iterator[None]:
    """Seed python ``random``, numpy and torch (CPU) for the block, then restore their states."""
    py, npy = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(npy)


# --------------------------------------------------------------------------- dataset
@dataclass
class Item:
    """One sample: image [C, H, W] and class index, or ``failure`` naming an unreadable file."""

    index: int
    image: torch.Tensor | None
    target: int
    failure: str | None = None


class ClassFolder(Dataset):
    """Images of a class folder, indexed by ``(index, seed)`` keys (``EpochBatchSampler``'s).

    Args:
        root: ``root/<class>/<image>``.
        transform: PIL image -> tensor; run under ``seeded_rngs(seed)``.
        classes: the class list (default: the folder's own, ``find_classes``).
    """

    def __init__(self, root: str | Path, transform: Transform, classes: Sequence[str] | None = None):
        self.root = Path(root)
        self.classes = list(classes) if classes is not None else find_classes(self.root)
        self.samples = list_samples(self.root, self.classes)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: tuple[int, int]) -> Item:
        index, seed = key
        path, target = self.samples[index]
        try:
            img = load_rgb(path)
        except Exception as exc:  # any decoder error: report the file, never crash the epoch
            return Item(index, None, target, f"{path}: {type(exc).__name__}: {exc}")
        with seeded_rngs(seed):
            return Item(index, self.transform(img), target)


def collate(items: list[Item]) -> dict[str, Any]:
    """Stack the readable samples: ``images`` [N, C, H, W], ``targets`` [N] int64, ``failures``."""
    good = [it for it in items if it.image is not None]
    return dict(
        images=torch.stack([it.image for it in good]) if good else torch.empty(0),  # type: ignore[misc]
        targets=torch.tensor([it.target for it in good], dtype=torch.int64),
        failures=[it.failure for it in items if it.failure is not None],
    )


# --------------------------------------------------------------------------- mixup
def build_mixup(cfg: Any, num_classes: int) -> Any:
    """timm ``Mixup`` for the fine-tuning recipe (soft targets with label smoothing), or None
    when mixup and cutmix are both off (then the loss applies label smoothing itself)."""
    if cfg.protocol != "finetune" or cfg.mixup_prob == 0 or (cfg.mixup == 0 and cfg.cutmix == 0):
        return None
    from timm.data import Mixup

    return Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=cfg.mixup_prob,
                 switch_prob=cfg.mixup_switch_prob, mode=cfg.mixup_mode, label_smoothing=cfg.smoothing,
                 num_classes=num_classes)


def build_criterion(cfg: Any, mixup: Any) -> torch.nn.Module:
    """Soft-target cross entropy with mixup, else label-smoothed, else plain cross entropy."""
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    if mixup is not None:
        return SoftTargetCrossEntropy()
    if cfg.protocol == "finetune" and cfg.smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=cfg.smoothing)
    return torch.nn.CrossEntropyLoss()
