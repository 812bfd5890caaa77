"""The classification options: one dataclass for the three protocols, used by the library, the
CLI and config files.

Protocols (``protocol``):
- ``finetune``: end-to-end fine-tuning, the MAE recipe (paper Table 9 / official README):
  AdamW (0.9, 0.999), wd 0.05, layer-wise lr decay, cosine with warmup, drop path 0.1,
  RandAug (9, 0.5), random erasing 0.25, mixup 0.8 / cutmix 1.0, label smoothing 0.1, global
  average pooling with ``fc_norm``.  With ``tune_blocks`` K (or ``mlp``) it is the paper's
  *partial* fine-tuning (section 4.3, same recipe; only the last K blocks, the final norm and the
  head train).
- ``linprobe``: frozen backbone, BatchNorm (no affine) + linear head on the class token, LARS
  (momentum 0.9), no weight decay, base lr 0.1, 90 epochs, 10 warmup, crop + flip only.

Options left ``None`` take the recipe's value for the protocol and architecture
(``recipe_defaults``): ViT-B (and smaller) fine-tunes 100 epochs at base lr 5e-4 with layer decay
0.65 and drop path 0.1; ViT-L/H 50 epochs at 1e-3 with 0.75 and drop path 0.2 / 0.3 (the
official FINETUNE.md scripts).  ``resolve`` fills them in; the resolved config is
what a run saves as ``config.json``.

A config file (YAML or JSON) holds the same keys as the flags; an unknown key, or a fine-tuning
key in a linear-probe config, is an error naming it.  Precedence: defaults < file < flags.
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from training.options import (
    RunOptions,
    add_arguments as add_option_flags,
    check_known_keys,
    given_flags,
    option,
    read_options_file,
)

PROTOCOLS = ("finetune", "linprobe")
POOLS = ("avg", "cls")
MIXUP_MODES = ("batch", "pair", "elem")

# Per-architecture fine-tuning recipes (paper Table 9 and the official FINETUNE.md scripts);
# architectures not listed use the ViT-B recipe.
_FT_BASE = dict(epochs=100, blr=5e-4, layer_decay=0.65, drop_path=0.1)
FINETUNE_RECIPES: dict[str, dict[str, float]] = {
    "vit_large_patch16": dict(epochs=50, blr=1e-3, layer_decay=0.75, drop_path=0.2),
    "vit_huge_patch14": dict(epochs=50, blr=1e-3, layer_decay=0.75, drop_path=0.3),
}
PROTOCOL_DEFAULTS: dict[str, dict[str, Any]] = {
    "finetune": dict(img_size=224, pool="avg", warmup_epochs=5, batch_size=64, min_lr=1e-6, weight_decay=0.05),
    "linprobe": dict(img_size=224, pool="cls", warmup_epochs=10, batch_size=512, min_lr=0.0, weight_decay=0.0, drop_path=0.0,
                     epochs=90, blr=0.1, layer_decay=1.0),
}


def recipe_defaults(protocol: str, arch: str | None) -> dict[str, Any]:
    """The recipe's values of the options left ``None``, for a protocol and an architecture."""
    out = dict(PROTOCOL_DEFAULTS[protocol])
    if protocol == "finetune":
        out.update(FINETUNE_RECIPES.get(arch or "", _FT_BASE))
    return out


def _opt(help: str, finetune_only: bool = False, **kw: Any) -> Any:
    return option(help, finetune_only=finetune_only, **kw)


@dataclass
class ClassifyConfig(RunOptions):
    """Every option of ``mae-transfer finetune`` / ``linprobe`` (field names are the flag names)."""

    TEXT_OPTIONS = {"model_kwargs": "JSON", "tune_blocks": "K"}

    protocol: str = _opt("finetune (incl. partial) or linprobe; set by the sub-command", default="finetune",
                         choices=PROTOCOLS)
    # data and output
    data: str = _opt("dataset root holding train/ and val/ class folders (ImageNet layout)", default="")
    train: str = _opt("training class folder (default: DATA/train)", default=None, type=str)
    val: str = _opt("validation class folder (default: DATA/val)", default=None, type=str)
    output: str = _opt("run folder: checkpoint.pth, model.safetensors, metrics.json, log.jsonl, TensorBoard",
                       default="")
    # model
    checkpoint: str = _opt("pretrained weights in any format mae_backbone reads (with --eval: the model to "
                           "evaluate)", default=None, type=str)
    checkpoint_format: str = _opt("format of --checkpoint (auto: detected)", default="auto")
    model: str = _opt("ViT architecture (default: the one the checkpoint names)", default=None, type=str)
    model_kwargs: dict = _opt('ViT overrides as JSON, e.g. \'{"depth": 6}\' (default: the checkpoint\'s)',
                              default={})
    img_size: int = _opt("input resolution in pixels (default 224; --eval: the checkpoint's)", default=None, type=int)
    pool: str = _opt("feature: avg = mean of patch tokens + fc_norm, cls = class token after norm "
                     "(recipe: finetune avg, linprobe cls)", default=None, type=str, choices=POOLS)
    tune_blocks: str = _opt("partial fine-tuning: 'all', K (the last K blocks + final norm + head train), or "
                            "'mlp' / 0.5 (the MLP half of the last block)", default="all", finetune_only=True)
    drop_path: float = _opt("stochastic depth rate (recipe: ViT-B 0.1, L 0.2, H 0.3)", default=None, type=float,
                            finetune_only=True)
    # optimization
    epochs: int = _opt("training epochs (recipe: ViT-B 100, L/H 50; linprobe 90)", default=None, type=int)
    warmup_epochs: int = _opt("linear warmup epochs (recipe: 5; linprobe 10)", default=None, type=int)
    batch_size: int = _opt("images per process per micro-batch (recipe: 64; linprobe 512)", default=None, type=int)
    accum_iter: int = _opt("micro-batches per optimizer step", default=1)
    blr: float = _opt("base lr: lr = blr x effective batch / 256 (recipe: ViT-B 5e-4, L/H 1e-3; linprobe 0.1)",
                      default=None, type=float)
    lr: float = _opt("absolute learning rate (overrides --blr)", default=None, type=float)
    min_lr: float = _opt("final lr of the cosine schedule (recipe: 1e-6; linprobe 0)", default=None, type=float)
    weight_decay: float = _opt("weight decay (recipe: 0.05; linprobe 0)", default=None, type=float)
    layer_decay: float = _opt("layer-wise lr decay (recipe: ViT-B 0.65, L/H 0.75)", default=None, type=float,
                              finetune_only=True)
    clip_grad: float = _opt("clip the gradient norm to this value", default=None, type=float)
    smoothing: float = _opt("label smoothing", default=0.1, finetune_only=True)
    mixup: float = _opt("mixup alpha (0: off)", default=0.8, finetune_only=True)
    cutmix: float = _opt("cutmix alpha (0: off)", default=1.0, finetune_only=True)
    mixup_prob: float = _opt("probability of mixing a batch", default=1.0, finetune_only=True)
    mixup_switch_prob: float = _opt("probability of cutmix instead of mixup when both are on", default=0.5,
                                    finetune_only=True)
    mixup_mode: str = _opt("mix per batch, pair or element", default="batch", choices=MIXUP_MODES,
                           finetune_only=True)
    aa: str = _opt("timm AutoAugment/RandAugment policy ('none': off)", default="rand-m9-mstd0.5-inc1",
                   finetune_only=True)
    reprob: float = _opt("random erasing probability", default=0.25, finetune_only=True)
    remode: str = _opt("random erasing fill", default="pixel", choices=("const", "rand", "pixel"),
                       finetune_only=True)
    recount: int = _opt("random erasing count", default=1, finetune_only=True)
    crop_scale: float = _opt("training: smallest area fraction of RandomResizedCrop (recipe: 0.08, timm's and "
                             "MAE's default)", default=0.08)
    crop_pct: float = _opt("evaluation: resize to img_size / crop_pct, center crop", default=0.875)
    ema_decay: float = _opt("keep an EMA of the weights with this decay, also evaluated (e.g. 0.9999)",
                            default=None, type=float)
    seed: int = _opt("seed of the head init, data order, augmentations, mixup and drop path", default=0)
    # checkpoints, evaluation and feedback (precision, device, workers, tensorboard ...: RunOptions)
    eval: bool = _opt("only evaluate --checkpoint on the validation folder", default=False)
    eval_every: int = _opt("evaluate every N epochs (and at the end)", default=1)
    save_every: int = _opt("write checkpoint.pth every N epochs (and at the end)", default=1)
    log_every: int = _opt("log the loss every N optimizer steps", default=20)
    resume: str = _opt("training checkpoint to resume from", default=None, type=str)

    # ------------------------------------------------------------------ derived
    @property
    def global_pool(self) -> bool:
        return (self.pool or PROTOCOL_DEFAULTS[self.protocol]["pool"]) == "avg"

    @property
    def train_dir(self) -> Path:
        return Path(self.train) if self.train else Path(self.data) / "train"

    @property
    def val_dir(self) -> Path:
        return Path(self.val) if self.val else Path(self.data) / "val"

    def tune(self) -> str | int:
        """``tune_blocks`` parsed: ``'all'``, ``'mlp'`` or an int K; linprobe: ``'head'``."""
        if self.protocol == "linprobe":
            return "head"
        return parse_tune_blocks(self.tune_blocks)

    # ------------------------------------------------------------------ checks
    def validate(self) -> "ClassifyConfig":
        """Raise ``ValueError`` naming the option when a value cannot work; return self."""
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {', '.join(PROTOCOLS)}, got {self.protocol!r}")
        if not self.data and not (self.val and (self.train or self.eval)):
            raise ValueError("data: give the dataset root (--data DIR with train/ and val/) or --train and --val")
        if not self.output and not self.eval:
            raise ValueError("output: give the run folder (--output DIR)")
        if self.eval and not (self.checkpoint or self.resume):
            raise ValueError("eval: give the model to evaluate with --checkpoint")
        self.check_choices()
        self.tune()  # raises on a bad tune_blocks
        self.check_ranges(
            at_least_one=("img_size", "accum_iter", "eval_every", "save_every", "log_every", "max_nonfinite",
                          "epochs", "batch_size", "recount"),
            not_negative=("warmup_epochs", "num_workers", "min_lr", "weight_decay", "drop_path", "smoothing",
                          "mixup", "cutmix", "reprob", "blr", "lr"))
        for name in ("mixup_prob", "mixup_switch_prob", "reprob", "smoothing"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.layer_decay is not None and not 0.0 < self.layer_decay <= 1.0:
            raise ValueError(f"layer_decay must be in (0, 1], got {self.layer_decay}")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1), got {self.ema_decay}")
        if not 0.0 < self.crop_pct <= 1.0:
            raise ValueError(f"crop_pct must be in (0, 1], got {self.crop_pct}")
        if not 0.0 < self.crop_scale <= 1.0:
            raise ValueError(f"crop_scale must be in (0, 1], got {self.crop_scale}")
        if not isinstance(self.model_kwargs, dict):
            raise ValueError(f"model_kwargs must be a mapping, got {self.model_kwargs!r}")
        bad = sorted(set(self.model_kwargs) & {"img_size", "num_classes", "global_pool", "drop_path_rate"})
        if bad:
            raise ValueError(f"model_kwargs: set {', '.join(bad)} with their own options (--img-size, --pool, "
                             "--drop-path), not inside model_kwargs")
        check_known_keys("model_kwargs", self.model_kwargs, _vit_options(), "a ViT option")
        if self.protocol == "linprobe":
            changed = self.changed(n for n, f in _FIELDS.items() if f.metadata.get("finetune_only"))
            if changed:
                raise ValueError(f"{', '.join(changed)}: fine-tuning options; a linear probe does not use them")
        return self

    def resolve(self, arch: str | None) -> "ClassifyConfig":
        """A copy with every ``None`` recipe option filled in for ``arch`` (see ``recipe_defaults``)."""
        values = {k: v for k, v in recipe_defaults(self.protocol, arch).items() if getattr(self, k) is None}
        if self.model is None and arch is not None:
            values["model"] = arch
        return dataclasses.replace(self, **values)

    @classmethod
    def coerce(cls, name: str, value: Any) -> Any:
        if name == "tune_blocks" and value is not None:
            return str(value)  # 'all', 'mlp', 0.5 or K: parsed by parse_tune_blocks
        return super().coerce(name, value)


_FIELDS: dict[str, dataclasses.Field] = ClassifyConfig.option_fields()


def _vit_options() -> set[str]:
    """The ``VisionTransformer`` arguments ``model_kwargs`` may set (not those the protocol sets)."""
    import inspect

    from mae_backbone.vit import VisionTransformer

    params = set(inspect.signature(VisionTransformer.__init__).parameters) - {"self", "args", "kwargs"}
    return params - {"img_size", "num_classes", "global_pool", "drop_path_rate"}


def parse_tune_blocks(value: str | int | float) -> str | int:
    """``'all'`` | ``'mlp'`` (also ``0.5``) | K >= 0 blocks.  Raises ``ValueError`` otherwise."""
    text = str(value).strip().lower()
    if text in ("all", "mlp"):
        return text
    if text in ("0.5", ".5"):
        return "mlp"
    try:
        k = int(text)
    except ValueError:
        raise ValueError(f"tune_blocks: expected 'all', 'mlp' (or 0.5) or a number of blocks, got {value!r}") from None
    if k < 0:
        raise ValueError(f"tune_blocks must not be negative, got {k}")
    return k


def fields_for(protocol: str) -> list[str]:
    """The option names a protocol accepts (``protocol`` itself is set by the sub-command)."""
    return [n for n, f in _FIELDS.items() if n != "protocol" and (protocol == "finetune" or not f.metadata.get("finetune_only"))]


def _refused(protocol: str) -> dict[str, str]:
    allowed = fields_for(protocol)
    return {n: "a fine-tuning option; a linear probe does not use it" for n in _FIELDS if n not in allowed + ["protocol"]}


def _file_values(path: str | Path, protocol: str) -> dict[str, Any]:
    values = read_options_file(path)
    if values.get("protocol", protocol) != protocol:
        raise ValueError(f"{path}: a {values['protocol']} config, used for {protocol}")
    return values


def load_config_file(path: str | Path, protocol: str) -> dict[str, Any]:
    """Options from a YAML (``.yaml``/``.yml``) or JSON file (e.g. a run's ``config.json``)."""
    return ClassifyConfig.gather([(str(path), _file_values(path, protocol))], fields_for(protocol) + ["protocol"],
                                 _refused(protocol))


def make_config(protocol: str, values: Mapping[str, Any] | None = None,
                config_file: str | Path | None = None) -> ClassifyConfig:
    """Defaults, then the file's values, then ``values`` (e.g. explicit flags); validated."""
    sources = [(str(config_file), _file_values(config_file, protocol))] if config_file else []
    if values:
        sources.append(("options", values))
    merged = ClassifyConfig.gather(sources, fields_for(protocol) + ["protocol"], _refused(protocol))
    merged["protocol"] = protocol
    return ClassifyConfig(**merged).validate()


def add_arguments(parser: argparse.ArgumentParser, protocol: str) -> None:
    """``--config`` and one flag per option of ``protocol`` (``training.options.add_arguments``)."""
    add_option_flags(parser, ClassifyConfig, fields_for(protocol))


def config_from_args(args: argparse.Namespace, protocol: str) -> ClassifyConfig:
    """The config of a parsed command line (see ``add_arguments``)."""
    return make_config(protocol, given_flags(args, fields_for(protocol)), getattr(args, "config", None))
