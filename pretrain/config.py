"""The pretraining configuration: one dataclass, used by the library, the CLI and config files.

Defaults are the paper's recipe (ViT-B: 800 epochs, 40 warmup, mask 0.75 random, norm-pixel
target, RandomResizedCrop + flip, AdamW 0.9/0.95, wd 0.05, base lr 1.5e-4 x batch / 256).

A config file (YAML or JSON) holds the same keys as the flags (``mask_ratio`` or ``mask-ratio``);
an unknown key is an error that names it and suggests the closest valid key.  Precedence:
defaults < config file < command-line flags.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from pretrain.data import AUGMENTATIONS
from pretrain.masking import MASKINGS
from pretrain.model import MAE_ARCHS, TARGETS
from training.precision import PRECISIONS
from training.options import canonical_keys, coerce_value, read_options_file

# what ``--method`` pretrains: MAE, or a controlled baseline (pretrain.moco / pretrain.supervised)
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


def _opt(help: str, **kw: Any) -> Any:
    default = kw.pop("default")
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata=dict(help=help, **kw))
    return field(default=default, metadata=dict(help=help, **kw))


@dataclass
class PretrainConfig:
    """Every option of ``mae-transfer pretrain`` (the field names are the flag names)."""

    # data and output
    data: str = _opt("training images: a folder (class subfolders or flat) or a text file listing images", default="")
    output: str = _opt("run folder: checkpoints, logs, TensorBoard, config.json, reconstruction grids", default="")
    # model
    method: str = _opt("what to pretrain: mae, or a baseline with the same budget: mocov3 (MoCo v3), supervised "
                       "(labels of the class folders)", default="mae", choices=METHODS)
    model: str = _opt("MAE architecture (its encoder is the ViT of every method)", default="mae_vit_base_patch16",
                      choices=tuple(MAE_ARCHS))
    img_size: int = _opt("input resolution (pixels)", default=224)
    model_kwargs: dict = _opt('encoder overrides as JSON, e.g. \'{"depth": 6, "patch_size": 8}\'', default={})
    decoder_depth: int = _opt("decoder blocks (paper ablation: 1/2/4/8/12)", default=8)
    decoder_dim: int = _opt("decoder width (paper ablation: 128/256/512/768/1024)", default=512)
    decoder_heads: int = _opt("decoder attention heads", default=16)
    encoder_mask_tokens: bool = _opt("the paper's 'w/ [M]' baseline: the encoder sees mask tokens", default=False)
    mask_ratio: float = _opt("fraction of patches removed", default=0.75)
    masking: str = _opt("which patches are removed", default="random", choices=MASKINGS)
    target: str = _opt("regression target", default="norm_pixel", choices=TARGETS)
    aug: str = _opt("augmentation (paper Table 1e)", default="crop_rand", choices=AUGMENTATIONS)
    grad_checkpointing: bool = _opt("recompute block activations in backward (less memory)", default=False)
    # MoCo v3 (--method mocov3)
    moco_temperature: float = _opt("MoCo v3: InfoNCE temperature tau", default=0.2)
    moco_momentum: float = _opt("MoCo v3: momentum m0 of the key encoder, rising to 1 by a half-cosine", default=0.99)
    moco_proj_hidden: int = _opt("MoCo v3: hidden width of the 3-layer projection MLP", default=4096)
    moco_dim: int = _opt("MoCo v3: output width of the projection and prediction MLPs", default=256)
    moco_pred_hidden: int = _opt("MoCo v3: hidden width of the 2-layer prediction MLP", default=4096)
    # optimization
    epochs: int = _opt("training epochs", default=800)
    warmup_epochs: int = _opt("linear warmup epochs", default=40)
    batch_size: int = _opt("images per process per micro-batch", default=64)
    accum_iter: int = _opt("micro-batches per optimizer step (gradient accumulation)", default=1)
    blr: float = _opt("base learning rate: lr = blr x effective batch / 256", default=1.5e-4)
    lr: float = _opt("absolute learning rate (overrides --blr)", default=None, type=float)
    min_lr: float = _opt("final learning rate of the cosine schedule", default=0.0)
    weight_decay: float = _opt("AdamW weight decay (not on norms, biases, tokens, pos-embeds)", default=0.05)
    clip_grad: float = _opt("clip the gradient norm to this value", default=None, type=float)
    precision: str = _opt("auto = bf16 on a GPU that has it, else fp32; fp16 uses a grad scaler",
                          default="auto", choices=PRECISIONS)
    seed: int = _opt("seed of the data order, augmentations, masks and initialization", default=0)
    # runtime
    num_workers: int = _opt("data-loading processes per training process", default=8)
    device: str = _opt("auto, cpu, cuda", default="auto")
    dist_backend: str = _opt("torch.distributed backend: auto = nccl with CUDA, else gloo", default="auto")
    # checkpoints and feedback
    save_every: int = _opt("write the checkpoint every N epochs (and at the end)", default=20)
    vis_every: int = _opt("write a reconstruction grid PNG every N epochs (0: never)", default=20)
    vis_images: int = _opt("images in the reconstruction grid", default=4)
    log_every: int = _opt("log the loss every N optimizer steps (JSON lines, TensorBoard)", default=20)
    tensorboard: bool = _opt("write TensorBoard scalars", default=True)
    progress: bool = _opt("show a progress bar", default=True)
    resume: str = _opt("checkpoint to resume from", default=None, type=str)
    auto_resume: bool = _opt("resume from OUTPUT/checkpoint.pth when it exists", default=True)
    max_nonfinite: int = _opt("stop after this many optimizer steps in a row with a non-finite loss", default=10)

    # ------------------------------------------------------------------ checks
    def validate(self) -> "PretrainConfig":
        """Raise ``ValueError`` naming the option when a value cannot work; return self."""
        if not self.data:
            raise ValueError("data: give the training images (--data FOLDER or list file)")
        if not self.output:
            raise ValueError("output: give the run folder (--output DIR)")
        for name in fields():
            choices = _FIELDS[name].metadata.get("choices")
            if choices and getattr(self, name) not in choices:
                value = getattr(self, name)
                close = difflib.get_close_matches(str(value), choices, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise ValueError(f"{name}: {value!r} is not one of {', '.join(choices)}{hint}")
        positive = ("img_size", "decoder_depth", "decoder_dim", "decoder_heads", "epochs", "batch_size",
                    "accum_iter", "save_every", "log_every", "max_nonfinite")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("warmup_epochs", "num_workers", "vis_every", "vis_images", "min_lr", "weight_decay"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative, got {getattr(self, name)}")
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
            if key not in ENCODER_ARGS:
                close = difflib.get_close_matches(key, sorted(ENCODER_ARGS), n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise ValueError(f"model_kwargs: {key!r} is not an encoder option{hint} "
                                 f"(options: {', '.join(sorted(ENCODER_ARGS))})")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, got {self.device!r}")
        for name in ("moco_temperature", "moco_proj_hidden", "moco_dim", "moco_pred_hidden"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not 0.0 <= self.moco_momentum <= 1.0:
            raise ValueError(f"moco_momentum must be in [0, 1], got {self.moco_momentum}")
        if self.method == "mocov3" and self.batch_size < 2:
            raise ValueError("batch_size must be at least 2 with --method mocov3 (the other images are the negatives)")
        unused = [n for n in fields() if (n in MAE_ONLY and self.method != "mae" or
                                          n in MOCO_ONLY and self.method != "mocov3")
                  and getattr(self, n) != _FIELDS[n].default]
        if unused:
            raise ValueError(f"{', '.join(unused)}: not an option of --method {self.method}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_FIELDS = {f.name: f for f in dataclasses.fields(PretrainConfig)}


def fields() -> list[str]:
    """The option names, in declaration order."""
    return list(_FIELDS)


def _coerce(name: str, value: Any) -> Any:
    """Values from JSON/YAML/strings into the field's type (int for float fields is fine)."""
    f = _FIELDS[name]
    kind: type = dict if f.default is dataclasses.MISSING else (f.metadata.get("type") or type(f.default))
    if isinstance(value, bool) and kind in (int, float):
        return value  # a bool for a number is kept as given here (classification reads it as 0 / 1)
    return coerce_value(name, value, kind)


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Options from a YAML (``.yaml``/``.yml``) or JSON file; unknown keys are an error."""
    values = canonical_keys(read_options_file(path), str(path), list(_FIELDS))
    return {k: _coerce(k, v) for k, v in values.items()}


def make_config(values: Mapping[str, Any] | None = None, config_file: str | Path | None = None) -> PretrainConfig:
    """Defaults, then the file's values, then ``values`` (e.g. explicit flags); validated."""
    merged: dict[str, Any] = {}
    if config_file:
        merged.update(load_config_file(config_file))
    if values:
        given = canonical_keys(values, "options", list(_FIELDS))
        merged.update({k: _coerce(k, v) for k, v in given.items()})
    for key, value in METHOD_DEFAULTS.get(merged.get("method", "mae"), {}).items():
        merged.setdefault(key, value)
    return PretrainConfig(**merged).validate()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per option; flags that are not given stay absent from the namespace (SUPPRESS),
    so a config file's value is only overridden by a flag the user typed."""
    parser.add_argument("--config", default=None, help="YAML or JSON file of options (keys are the flag names)")
    for name, f in _FIELDS.items():
        flag = "--" + name.replace("_", "-")
        meta = f.metadata
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        help_text = f"{meta['help']} (default: {json.dumps(default) if isinstance(default, dict) else default})"
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text)
        elif name == "model_kwargs":
            parser.add_argument(flag, default=argparse.SUPPRESS, metavar="JSON", help=help_text)
        else:
            kind = meta.get("type") or type(default)
            parser.add_argument(flag, type=kind, default=argparse.SUPPRESS, choices=meta.get("choices"),
                                help=help_text)


def config_from_args(args: argparse.Namespace) -> PretrainConfig:
    """The config of a parsed command line (see ``add_arguments``)."""
    given = {k: v for k, v in vars(args).items() if k in _FIELDS}
    return make_config(given, getattr(args, "config", None))
