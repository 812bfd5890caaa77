"""The pretraining configuration: one dataclass, used by the library, the CLI and config files.

Defaults are the paper's recipe (ViT-B: 800 epochs, 40 warmup, mask 0.75 random, norm-pixel
target, RandomResizedCrop + flip, AdamW 0.9/0.95, wd 0.05, base lr 1.5e-4 x batch / 256).

A config file (YAML or JSON) holds the same keys as the flags (``mask_ratio`` or ``mask-ratio``);
an unknown key is an error that names it and suggests the closest valid key.  Precedence:
defaults < config file < command-line flags.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from pretrain.data import AUGMENTATIONS
from pretrain.masking import MASKINGS
from pretrain.model import MAE_ARCHS, TARGETS
from training.options import RunOptions, add_arguments as add_option_flags, check_known_keys, given_flags, option

# what ``--method`` pretrains: MAE, or a controlled baseline (pretrain.moco; the supervised one runs in mae_transfer.baselines)
METHODS = ("mae", "mocov3", "supervised")
# options that only one method reads; giving one of them another value with another method is an error
MAE_ONLY = ("decoder_depth", "decoder_dim", "decoder_heads", "encoder_mask_tokens", "mask_ratio", "masking", "target",
            "aug", "vis_every", "vis_images")
MOCO_ONLY = ("moco_temperature", "moco_momentum", "moco_proj_hidden", "moco_dim", "moco_pred_hidden")
# a method's recipe values of options the user did not give (MoCo v3: AdamW wd 0.1; DeiT: lr 5e-4 per 512 images)
METHOD_DEFAULTS: dict[str, dict[str, Any]] = {"mocov3": {"weight_decay": 0.1}, "supervised": {"blr": 2.5e-4}}
# encoder arguments that model_kwargs may override (the ViT architecture)
ENCODER_ARGS = ("patch_size", "in_chans", "embed_dim", "depth", "num_heads", "mlp_ratio", "qkv_bias", "norm_eps",
                "drop_path_rate")
_MANAGED_ENCODER_ARGS = {"img_size": "img_size", "grad_checkpointing": "grad_checkpointing"}


@dataclass
class PretrainConfig(RunOptions):
    """Every option of ``mae-transfer pretrain`` (the field names are the flag names)."""

    TEXT_OPTIONS = {"model_kwargs": "JSON"}

    # data and output
    data: str = option("training images: a folder (class subfolders or flat) or a text file listing images", default="")
    output: str = option("run folder: checkpoints, logs, TensorBoard, config.json, reconstruction grids", default="")
    # model
    method: str = option("what to pretrain: mae, or a baseline with the same budget: mocov3 (MoCo v3), supervised "
                       "(labels of the class folders)", default="mae", choices=METHODS)
    model: str = option("MAE architecture (its encoder is the ViT of every method)", default="mae_vit_base_patch16",
                      choices=tuple(MAE_ARCHS))
    img_size: int = option("input resolution (pixels)", default=224)
    model_kwargs: dict = option('encoder overrides as JSON, e.g. \'{"depth": 6, "patch_size": 8}\'', default={})
    decoder_depth: int = option("decoder blocks (paper ablation: 1/2/4/8/12)", default=8)
    decoder_dim: int = option("decoder width (paper ablation: 128/256/512/768/1024)", default=512)
    decoder_heads: int = option("decoder attention heads", default=16)
    encoder_mask_tokens: bool = option("the paper's 'w/ [M]' baseline: the encoder sees mask tokens", default=False)
    mask_ratio: float = option("fraction of patches removed", default=0.75)
    masking: str = option("which patches are removed", default="random", choices=MASKINGS)
    target: str = option("regression target", default="norm_pixel", choices=TARGETS)
    aug: str = option("augmentation (paper Table 1e)", default="crop_rand", choices=AUGMENTATIONS)
    grad_checkpointing: bool = option("recompute block activations in backward (less memory)", default=False)
    # MoCo v3 (--method mocov3)
    moco_temperature: float = option("MoCo v3: InfoNCE temperature tau", default=0.2)
    moco_momentum: float = option("MoCo v3: momentum m0 of the key encoder, rising to 1 by a half-cosine", default=0.99)
    moco_proj_hidden: int = option("MoCo v3: hidden width of the 3-layer projection MLP", default=4096)
    moco_dim: int = option("MoCo v3: output width of the projection and prediction MLPs", default=256)
    moco_pred_hidden: int = option("MoCo v3: hidden width of the 2-layer prediction MLP", default=4096)
    # optimization
    epochs: int = option("training epochs", default=800)
    warmup_epochs: int = option("linear warmup epochs", default=40)
    batch_size: int = option("images per process per micro-batch", default=64)
    accum_iter: int = option("micro-batches per optimizer step (gradient accumulation)", default=1)
    blr: float = option("base learning rate: lr = blr x effective batch / 256", default=1.5e-4)
    lr: float = option("absolute learning rate (overrides --blr)", default=None, type=float)
    min_lr: float = option("final learning rate of the cosine schedule", default=0.0)
    weight_decay: float = option("AdamW weight decay (not on norms, biases, tokens, pos-embeds)", default=0.05)
    clip_grad: float = option("clip the gradient norm to this value", default=None, type=float)
    seed: int = option("seed of the data order, augmentations, masks and initialization", default=0)
    # checkpoints and feedback (precision, device, workers, tensorboard, progress, auto_resume, max_nonfinite: RunOptions)
    save_every: int = option("write the checkpoint every N epochs (and at the end)", default=20)
    vis_every: int = option("write a reconstruction grid PNG every N epochs (0: never)", default=20)
    vis_images: int = option("images in the reconstruction grid", default=4)
    log_every: int = option("log the loss every N optimizer steps (JSON lines, TensorBoard)", default=20)
    resume: str = option("checkpoint to resume from", default=None, type=str)

    # ------------------------------------------------------------------ checks
    def validate(self) -> "PretrainConfig":
        """Raise ``ValueError`` naming the option when a value cannot work; return self."""
        if not self.data:
            raise ValueError("data: give the training images (--data FOLDER or list file)")
        if not self.output:
            raise ValueError("output: give the run folder (--output DIR)")
        self.check_choices()
        self.check_ranges(
            at_least_one=("img_size", "decoder_depth", "decoder_dim", "decoder_heads", "epochs", "batch_size",
                          "accum_iter", "save_every", "log_every", "max_nonfinite"),
            not_negative=("warmup_epochs", "num_workers", "vis_every", "vis_images", "min_lr", "weight_decay"))
        if not 0.0 < self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in (0, 1), got {self.mask_ratio}")
        if self.decoder_dim % self.decoder_heads:
            raise ValueError(f"decoder_dim {self.decoder_dim} is not divisible by decoder_heads {self.decoder_heads}")
        if self.decoder_dim % 4:
            raise ValueError(f"decoder_dim must be a multiple of 4 (sin-cos position embedding), got {self.decoder_dim}")
        if not isinstance(self.model_kwargs, dict):
            raise ValueError(f"model_kwargs must be a mapping, got {self.model_kwargs!r}")
        for key in self.model_kwargs:
            if key in _MANAGED_ENCODER_ARGS:
                raise ValueError(f"model_kwargs: set {key!r} with its own option ({_MANAGED_ENCODER_ARGS[key]})")
        check_known_keys("model_kwargs", self.model_kwargs, ENCODER_ARGS, "an encoder option")
        for name in ("moco_temperature", "moco_proj_hidden", "moco_dim", "moco_pred_hidden"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not 0.0 <= self.moco_momentum <= 1.0:
            raise ValueError(f"moco_momentum must be in [0, 1], got {self.moco_momentum}")
        if self.method == "mocov3" and self.batch_size < 2:
            raise ValueError("batch_size must be at least 2 with --method mocov3 (the other images are the negatives)")
        unused = self.changed(n for n in fields() if (n in MAE_ONLY and self.method != "mae" or
                                                      n in MOCO_ONLY and self.method != "mocov3"))
        if unused:
            raise ValueError(f"{', '.join(unused)}: not an option of --method {self.method}")
        return self


def fields() -> list[str]:
    """The option names, in declaration order."""
    return list(PretrainConfig.option_fields())


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Options from a YAML (``.yaml``/``.yml``) or JSON file; unknown keys are an error."""
    return PretrainConfig.gather(PretrainConfig.sources(None, path))


def make_config(values: Mapping[str, Any] | None = None, config_file: str | Path | None = None) -> PretrainConfig:
    """Defaults, then the file's values, then ``values`` (e.g. explicit flags); validated."""
    merged = PretrainConfig.gather(PretrainConfig.sources(values, config_file))
    for key, value in METHOD_DEFAULTS.get(merged.get("method", "mae"), {}).items():
        merged.setdefault(key, value)
    return PretrainConfig(**merged).validate()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``--config`` and one flag per option (``training.options.add_arguments``)."""
    add_option_flags(parser, PretrainConfig)


def config_from_args(args: argparse.Namespace) -> PretrainConfig:
    """The config of a parsed command line (see ``add_arguments``)."""
    return make_config(given_flags(args, fields()), getattr(args, "config", None))
