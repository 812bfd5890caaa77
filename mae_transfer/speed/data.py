"""Part ``data``: decode (Pillow) + the pretraining augmentation (RandomResizedCrop, flip, normalize)
of JPEG photos, img/s in this process (one loader worker's worth)."""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from mae_transfer.speed.harness import Case, Report, interleave


def run(args: argparse.Namespace, report: Report, device: torch.device) -> None:
    """Decode + augment throughput of JPEG photos (skimage's sample photographs, ImageNet-sized).

    Always on the CPU (``device`` is not used: data loading runs in CPU workers).
    """
    import numpy as np
    from PIL import Image

    from pretrain.data import build_transform, load_rgb

    try:
        from importlib import resources

        names = ["astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png"]
        photos = []
        for name in names:
            with resources.as_file(resources.files("skimage.data") / name) as p:
                if p.exists():
                    photos.append(Image.open(p).convert("RGB"))
    except ImportError:
        photos = []
    if not photos:  # no scikit-image: smooth random images (JPEG decodes the same amount of data)
        rng = np.random.default_rng(0)
        photos = [Image.fromarray(rng.integers(0, 255, (375, 500, 3), dtype=np.uint8)) for _ in range(4)]
    transform = build_transform("crop_rand", args.img_size)
    with tempfile.TemporaryDirectory() as tmp:
        files = []
        for i, img in enumerate(photos):
            img = img.resize((500, 375)) if img.width >= img.height else img.resize((375, 500))
            path = Path(tmp) / f"{i}.jpg"
            img.save(path, quality=90)
            files.append(path)
        n = args.data_images

        def load() -> None:
            for i in range(n):
                transform(load_rgb(files[i % len(files)]))

        case = Case("decode+aug", load, n)
        interleave([case], args.steps, 1, torch.device("cpu"), flops=False)
    report.add("data (500x375 JPEG)", case, None, note="one process; a DataLoader runs one per worker")
