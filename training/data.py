"""What every trainer reads images with: decoding, the file list, a reproducible epoch order.

- ``load_rgb``: any image file as 8-bit RGB (16-bit grayscale scaled, not clipped);
- ``list_images``: a folder searched recursively (ImageNet-style class folders or a flat folder),
  or a text file with one image path per line (relative to the list file; blank lines and ``#``
  comments are ignored); ``image_files`` is the folder search: symlinked folders are followed,
  but a folder is never entered twice (by its real path) and a file reached by two paths counts
  once, so a symlink cycle neither hangs the scan nor repeats images;
- ``EpochBatchSampler``: every random choice of an epoch is a pure function of ``(seed, epoch)``:
  the order, and per sample the seed of its augmentation (``sample_seed(seed, epoch, index)``).
  A resumed run sees exactly the data the uninterrupted run would have, and N processes with
  batch B each see exactly what one process with batch N*B sees;
- ``EvalBatchSampler``: every sample once, in order, split over the processes.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Iterator

import torch
from PIL import Image
from torch.utils.data import Sampler

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_MASK64 = (1 << 64) - 1

logger = logging.getLogger(__name__)


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
        if src.is_symlink() and not src.exists():
            raise DataError(f"{src}: a broken symlink or a symlink loop (-> {os.readlink(src)})")
        raise DataError(f"{src}: no such folder or list file")
    files = image_files(src)
    if not files:
        raise DataError(f"{src}: no image files ({', '.join(IMG_EXTENSIONS)}) in the folder or its subfolders")
    return files


def image_files(folder: str | os.PathLike) -> list[Path]:
    """The image files under ``folder``, recursively, in sorted walk order; hidden folders skipped.

    Symlinked folders are followed, but each folder is entered once (by its real path) and each
    real file is listed once (under the first path that reaches it); a link back to the folder or
    to a folder that holds it is not followed.  So a symlink cycle (``a/b/up -> ..``) neither hangs
    the scan nor counts an image many times, and a class folder's link up to the dataset root does
    not pull in the other classes' images.  What was skipped
    is logged as one warning.
    """
    root_dir = Path(folder)
    real_root = Path(os.path.realpath(root_dir))
    # the folder and the folders that hold it: a link to any of them leads back into the scan
    seen_dirs = {str(real_root), *(str(p) for p in real_root.parents)}
    seen_files: set[str] = set()
    files: list[Path] = []
    repeats: list[str] = []
    for root, dirs, names in os.walk(root_dir, followlinks=True):
        keep = []
        for d in sorted(d for d in dirs if not d.startswith(".")):
            real = os.path.realpath(os.path.join(root, d))
            if real in seen_dirs:  # a cycle, or a second link to a folder already scanned
                repeats.append(os.path.join(root, d))
            else:
                seen_dirs.add(real)
                keep.append(d)
        dirs[:] = keep
        for n in sorted(names):
            if not n.lower().endswith(IMG_EXTENSIONS):
                continue
            path = Path(root) / n
            real = os.path.realpath(path)
            if real in seen_files:
                repeats.append(str(path))
            else:
                seen_files.add(real)
                files.append(path)
    if repeats:
        logger.warning("%s: skipped %d symlinked paths to folders or images already listed (each image is "
                       "used once), e.g. %s", root_dir, len(repeats), repeats[0])
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


def read_image(path: str | os.PathLike) -> Image.Image:
    """``load_rgb`` for an image the user named (no dataset to skip it in): whatever keeps it from
    being decoded (missing, truncated, not an image, a decompression bomb) is a ``DataError``
    naming the file.
    """
    try:
        return load_rgb(path)
    except Image.DecompressionBombError as exc:
        raise DataError(f"{path}: refused as a possible decompression bomb ({exc})") from None
    except FileNotFoundError:
        raise DataError(f"{path}: no such image file") from None
    except IsADirectoryError:
        raise DataError(f"{path}: a folder, not an image file") from None
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, struct.error ... on bad files
        reason = str(exc).replace(f"{path!s}", "").replace("''", "").strip(" :") or type(exc).__name__
        if "truncated" in reason.lower():
            reason = f"the file is truncated: {reason}"
        raise DataError(f"{path}: not a readable image ({reason})") from None


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


class EvalBatchSampler(Sampler[list[tuple[int, int]]]):
    """Every sample once, in order: process ``rank`` takes indices ``rank, rank + world_size, ...``."""

    def __init__(self, num_samples: int, batch_size: int, rank: int = 0, world_size: int = 1):
        self.indices = list(range(rank, num_samples, world_size))
        self.batch_size = batch_size

    def __len__(self) -> int:
        return (len(self.indices) + self.batch_size - 1) // self.batch_size

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for j in range(0, len(self.indices), self.batch_size):
            yield [(i, 0) for i in self.indices[j : j + self.batch_size]]
