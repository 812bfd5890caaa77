"""How separable the demo's classes are in an encoder's frozen features, without a training recipe.

Average-pooled patch features of the labeled training and val images of the sample data, each
feature standardised on the training set, then an L2-regularised logistic regression fitted to
convergence by L-BFGS for each regularisation strength; prints val top-1 per strength, for the
encoder at random initialization (same seed as the demo) and for each checkpoint given.

    python tools/probe_features.py demo_output/data demo_output/pretrain/encoder.safetensors
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mae_backbone import create_vit, load_checkpoint
from mae_transfer.runners import Recipe
from training.data import IMAGENET_MEAN, IMAGENET_STD


def load_split(root: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, 3, H, W] ImageNet-normalised images and [N] labels of a class-folder split."""
    images, labels = [], []
    for label, folder in enumerate(sorted(p for p in root.iterdir() if p.is_dir())):
        for path in sorted(folder.glob("*.png")):
            images.append(np.asarray(Image.open(path).convert("RGB"), np.float32) / 255)
            labels.append(label)
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)
    mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
    return (x - mean[:, None, None]) / std[:, None, None], torch.tensor(labels)


@torch.no_grad()
def features(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Mean of the patch tokens of the last block (after the final norm)."""
    return torch.cat([model.forward_features(x[i:i + 100])[:, 1:].mean(1) for i in range(0, len(x), 100)])


def probe(train: torch.Tensor, y_train: torch.Tensor, val: torch.Tensor, y_val: torch.Tensor,
          weight_decay: float) -> float:
    """Val top-1 (%) of a logistic regression on standardised features."""
    mean, std = train.mean(0), train.std(0) + 1e-6
    train, val = (train - mean) / std, (val - mean) / std
    classes = int(y_train.max()) + 1
    w = torch.zeros(train.shape[1], classes, requires_grad=True)
    b = torch.zeros(classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=300)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(train @ w + b, y_train) + weight_decay * (w ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return float(((val @ w + b).argmax(1) == y_val).float().mean()) * 100


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data", type=Path, help="the sample data folder (holds classification/train and val)")
    parser.add_argument("checkpoints", nargs="*", type=Path, help="encoders to probe besides random init")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random initialization")
    args = parser.parse_args()
    recipe = Recipe.demo()
    x_train, y_train = load_split(args.data / "classification" / "train")
    x_val, y_val = load_split(args.data / "classification" / "val")
    for name in ["random init", *map(str, args.checkpoints)]:
        torch.manual_seed(args.seed)
        model = create_vit(recipe.arch.name, img_size=recipe.img_size, **recipe.arch.overrides).eval()
        if name != "random init":
            load_checkpoint(model, name)
        f_train, f_val = features(model, x_train), features(model, x_val)
        scores = ", ".join(f"wd {wd:g}: {probe(f_train, y_train, f_val, y_val, wd):.1f}" for wd in (1e-3, 1e-2, 1e-1))
        print(f"{name}: val top-1 (%) {scores}")


if __name__ == "__main__":
    main()
