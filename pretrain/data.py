"""Pretraining data: image files, the paper's augmentations, and a reproducible epoch order.

Sources (``list_images``): a folder searched recursively (ImageNet-style class folders or a flat
folder of images), or a text file with one image path per line (relative paths are relative to
the list file; blank lines and ``#`` comments are ignored).

Reproducibility: every random choice of an epoch is a pure function of ``(seed, epoch)``: the
order (``EpochBatchSampler``) and, per sample, its augmentation and its mask (seeded by
``sample_seed(seed, epoch, index)``).  So a resumed run sees exactly the data the uninterrupted
run would have, and N processes with batch B each see exactly what one process with batch N*B
sees.

Unreadable images: ``ImageFiles`` returns a ``failure`` instead of raising; ``collate`` drops the
sample and reports the file, so that one bad file never stops training.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
AUGMENTATIONS = ("none", "crop_fixed", "crop_rand", "crop_rand_colorjit")

_MASK64 = (1 << 64) - 1


class DataError(ValueError):
    """The data cannot be used for training (nothing found, nothing readable, too few images)."""


# --------------------------------------------------------------------------- seeds
def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def mix_seed(*values: int) -> int:
    """A well-mixed 63-bit seed from a sequence of integers (SplitMix64)."""
    h = 0
    for v in values:
        h = _splitmix64(h ^ (int(v) & _MASK64))
    return h >> 1


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of one sample's augmentation in one epoch (its mask uses ``mix_seed(this, 1)``)."""
    return mix_seed(seed, epoch, index)


# --------------------------------------------------------------------------- files
def list_images(source: str | os.PathLike) -> list[Path]:
    """Image files of a folder (recursive, sorted) or of a list file.

    Raises:
        DataError: the source does not exist or holds no image.
    """
    src = Path(source)
    if src.is_file():
        files = []
        for line in src.read_text().splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                p = Path(line)
                files.append(p if p.is_absolute() else src.parent / p)
        if not files:
            raise DataError(f"{src}: the list file names no image")
        return files
    if not src.is_dir():
        raise DataError(f"{src}: no such folder or list file")
    files = []
    for root, dirs, names in os.walk(src, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        files.extend(Path(root) / n for n in sorted(names) if n.lower().endswith(IMG_EXTENSIONS))
    if not files:
        raise DataError(f"{src}: no image files ({', '.join(IMG_EXTENSIONS)}) in the folder or its subfolders")
    return files


_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def load_rgb(path: str | os.PathLike) -> Image.Image:
    """Open and fully decode an image as 8-bit RGB (raises whatever PIL raises on a bad file).

    Grayscale, palette, CMYK and alpha images are converted by Pillow; 16-bit grayscale (``I;16``,
    or ``I`` as older Pillow opens 16-bit PNGs) is scaled from 0..65535 to 0..255, where Pillow's
    own conversion would clip everything above 255 to white.  Pillow's decompression-bomb limit
    (``PIL.Image.MAX_IMAGE_PIXELS``) applies: a larger image raises ``DecompressionBombError``.
    """
    with Image.open(path) as img:
        if img.mode in _SIXTEEN_BIT:
            import numpy as np

            values = np.asarray(img, dtype=np.float64)
            gray = np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8)
            return Image.fromarray(gray).convert("RGB")
        return img.convert("RGB")


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


# --------------------------------------------------------------------------- order
class EpochBatchSampler(Sampler[list[tuple[int, int]]]):
    """One process's micro-batches of ``(index, sample_seed)`` keys for an epoch.

    The epoch's permutation is ``randperm(num_samples)`` from a generator seeded by
    ``mix_seed(seed, epoch)``; it is cut into global micro-batches of ``batch_size * world_size``
    (the tail that does not fill a whole optimizer step is dropped) and process ``rank`` takes
    slice ``[rank * batch_size, (rank + 1) * batch_size)`` of each.  So the union over processes
    of micro-batch j is the same whatever ``world_size``, for the same global batch.

    Args:
        num_samples: dataset size.
        batch_size: per-process micro-batch.
        seed: the run's seed.
        rank, world_size: this process and the number of processes.
        accum_iter: micro-batches per optimizer step (whole steps only).
        shuffle: permute (else dataset order).
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        accum_iter: int = 1,
        shuffle: bool = True,
    ):
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.accum_iter = accum_iter
        self.shuffle = shuffle
        self.epoch = 0

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps per epoch."""
        return self.num_samples // (self.batch_size * self.world_size * self.accum_iter)

    def __len__(self) -> int:
        return self.steps_per_epoch * self.accum_iter

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        if self.shuffle:
            gen = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch))
            order = torch.randperm(self.num_samples, generator=gen).tolist()
        else:
            order = list(range(self.num_samples))
        global_micro = self.batch_size * self.world_size
        start = self.rank * self.batch_size
        for j in range(len(self)):
            chunk = order[j * global_micro + start : j * global_micro + start + self.batch_size]
            yield [(i, sample_seed(self.seed, self.epoch, i)) for i in chunk]
