"""Pretraining data: image files and the paper's augmentations.

The file list, decoding and the epoch order are the shared runtime's (``training.data``:
``list_images``, ``load_rgb``, ``EpochBatchSampler``); here each sample's augmentation runs with
torch's generator seeded by its ``sample_seed`` (and its mask uses ``mix_seed(sample_seed, 1)``).

Unreadable images: ``ImageFiles`` returns a ``failure`` instead of raising; ``collate`` drops the
sample and reports the file, so that one bad file never stops training.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from PIL import Image
from torch.utils.data import Dataset

from training.data import IMAGENET_MEAN, IMAGENET_STD, DataError, load_rgb

AUGMENTATIONS = ("none", "crop_fixed", "crop_rand", "crop_rand_colorjit")


# --------------------------------------------------------------------------- transforms
def build_transform(aug: str, img_size: int) -> Callable[[Image.Image], torch.Tensor]:
    """The paper's augmentation ablation (Table 1e), each ending in ToTensor + ImageNet Normalize.

    - ``none``: resize the short side to ``img_size``, center crop (no flip);
    - ``crop_fixed``: resize the short side to ``img_size / 0.875``, random ``img_size`` crop, flip;
    - ``crop_rand``: RandomResizedCrop(scale 0.2-1.0, bicubic) + flip (the default);
    - ``crop_rand_colorjit``: ``crop_rand`` + ColorJitter(0.4, 0.4, 0.4).
    """
    from torchvision import transforms as T

    bicubic = T.InterpolationMode.BICUBIC
    tail = [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    if aug == "none":
        head = [T.Resize(img_size, interpolation=bicubic), T.CenterCrop(img_size)]
    elif aug == "crop_fixed":
        head = [T.Resize(int(round(img_size / 0.875)), interpolation=bicubic), T.RandomCrop(img_size),
                T.RandomHorizontalFlip()]
    elif aug in ("crop_rand", "crop_rand_colorjit"):
        head = [T.RandomResizedCrop(img_size, scale=(0.2, 1.0), interpolation=bicubic), T.RandomHorizontalFlip()]
        if aug == "crop_rand_colorjit":
            head.append(T.ColorJitter(0.4, 0.4, 0.4))
    else:
        raise ValueError(f"unknown augmentation {aug!r}; choose one of {', '.join(AUGMENTATIONS)}")
    return T.Compose(head + tail)


# --------------------------------------------------------------------------- dataset
@dataclass
class Item:
    """One sample: its image [C, H, W] or, for an unreadable file, ``failure`` naming it."""

    index: int
    seed: int
    image: torch.Tensor | None
    failure: str | None = None


class ImageFiles(Dataset):
    """Images from a list of files, indexed by ``(index, sample_seed)`` keys.

    The augmentation of a sample runs with torch's generator seeded by its ``sample_seed`` (inside
    ``fork_rng``, so the caller's generator state is untouched).
    """

    def __init__(self, files: Sequence[Path], transform: Callable[[Image.Image], torch.Tensor]):
        self.files = list(files)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, key: tuple[int, int]) -> Item:
        index, seed = key
        path = self.files[index]
        try:
            img = load_rgb(path)
        except Exception as exc:  # any decoder error: report the file, never crash the epoch
            return Item(index, seed, None, f"{path}: {type(exc).__name__}: {exc}")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return Item(index, seed, self.transform(img))

    def first_readable(self) -> int:
        """Index of the first file that decodes.

        Raises:
            DataError: none of the files can be read (the message names the first failure).
        """
        first_error = None
        for i, path in enumerate(self.files):
            try:
                load_rgb(path)
                return i
            except Exception as exc:
                first_error = first_error or f"{path}: {type(exc).__name__}: {exc}"
        raise DataError(f"none of the {len(self.files)} image files can be read (first error: {first_error})")


def collate(items: list[Item]) -> dict[str, Any]:
    """Stack the readable samples of a micro-batch.

    Returns:
        ``images`` [N, C, H, W] (N may be 0), ``seeds`` [N] int64, ``indices`` [N] int64,
        ``failures``: one message per unreadable file.
    """
    good = [it for it in items if it.image is not None]
    failures = [it.failure for it in items if it.failure is not None]
    if good:
        images = torch.stack([it.image for it in good])  # type: ignore[misc]
    else:
        images = torch.empty(0)
    return dict(
        images=images,
        seeds=torch.tensor([it.seed for it in good], dtype=torch.int64),
        indices=torch.tensor([it.index for it in good], dtype=torch.int64),
        failures=failures,
    )
