"""What a transfer comparison is made of: the encoder architecture (``Arch``), the backbones
compared (``Backbone``), where the data is (``DataPaths``), the recipe every backbone goes through
(``Recipe``) and what one run gives back (``TaskResult``).

The demo and ``mae-transfer bench`` build these and hand them to the task runners
(``mae_transfer.runners.run_task``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TASKS = ("finetune", "linprobe", "partial", "segment", "detect")
TASK_METRICS: dict[str, tuple[str, ...]] = {
    "finetune": ("top-1",), "linprobe": ("top-1",), "partial": ("top-1",), "segment": ("mIoU",),
    "detect": ("AP box", "AP mask"),
}


@dataclass(frozen=True)
class Arch:
    """A ViT: a registered name (``mae_backbone.VIT_ARCHS``) and its overrides (depth, patch size)."""

    name: str
    kwargs: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def make(cls, name: str, **kwargs: Any) -> "Arch":
        return cls(name, tuple(sorted(kwargs.items())))

    @property
    def overrides(self) -> dict[str, Any]:
        return dict(self.kwargs)

    @property
    def dims(self) -> dict[str, int]:
        """``embed_dim``, ``depth``, ``num_heads``, ``patch_size`` after the overrides."""
        from mae_backbone import VIT_ARCHS

        dims = dict(VIT_ARCHS[self.name])
        dims.update({k: v for k, v in self.kwargs if k in dims})
        return dims

    @property
    def size(self) -> str | None:
        """``"B"`` / ``"L"`` / ``"H"`` when this is exactly a published model size, else None."""
        from mae_backbone import VIT_ARCHS

        letter = {"vit_base_patch16": "B", "vit_large_patch16": "L", "vit_huge_patch14": "H"}.get(self.name)
        return letter if letter and self.dims == VIT_ARCHS[self.name] else None

    def __str__(self) -> str:
        extra = ", ".join(f"{k}={v}" for k, v in self.kwargs)
        return f"{self.name}({extra})" if extra else self.name


def checkpoint_arch(path: str | Path) -> Arch:
    """The architecture of a checkpoint in any format ``mae_backbone`` reads."""
    from mae_backbone import VIT_ARCHS
    from mae_backbone.checkpoint import infer_arch, read_checkpoint

    sd, meta = read_checkpoint(path)
    facts = infer_arch(sd)
    if facts.get("arch") in VIT_ARCHS:
        return Arch.make(facts["arch"])
    if "embed_dim" not in facts or "depth" not in facts:
        raise ValueError(f"{path}: cannot tell the ViT architecture of this checkpoint (no patch embedding / blocks)")
    same_width = [n for n, a in VIT_ARCHS.items() if a["embed_dim"] == facts["embed_dim"]]
    if not same_width:
        raise ValueError(f"{path}: no registered ViT has width {facts['embed_dim']} (known: {', '.join(VIT_ARCHS)})")
    name = same_width[0]
    base = VIT_ARCHS[name]
    over = {k: facts[k] for k in ("depth", "patch_size") if facts[k] != base[k]}
    heads = meta.get("num_heads")
    if heads is not None and int(heads) != base["num_heads"]:
        over["num_heads"] = int(heads)
    return Arch.make(name, **over)


@dataclass(frozen=True)
class Backbone:
    """One encoder put through the transfer recipes: a checkpoint, or random init (``None``).

    ``layer_decay`` None takes the recipe's value for the architecture; ``method`` (``mae``,
    ``mocov3``, ``supervised``, ``scratch``) selects the published reference numbers.
    """

    name: str
    checkpoint: Path | None = None
    layer_decay: float | None = None
    method: str | None = None


@dataclass(frozen=True)
class DataPaths:
    """Where each task's data is; a task whose folder is None cannot run."""

    classification: Path | None = None  # train/ and val/ class folders
    coco: Path | None = None  # {train,val}2017/ and annotations/instances_{train,val}2017.json
    ade: Path | None = None  # ADEChallengeData2016 layout: images/ and annotations/ {training,validation}
    seg_classes: tuple[str, ...] | None = None  # None: ADE20K's 150 classes

    @classmethod
    def sample(cls, root: str | Path) -> "DataPaths":
        """The layout ``write_sample_data`` writes."""
        from mae_transfer.sample_data import SEG_CLASSES

        root = Path(root)
        return cls(root / "classification", root / "coco", root / "ade" / "ADEChallengeData2016", tuple(SEG_CLASSES))

    def require(self, task: str) -> Path:
        key = {"segment": "ade", "detect": "coco"}.get(task, "classification")
        path = getattr(self, key)
        if path is None:
            flag = {"classification": "--imagenet", "coco": "--coco", "ade": "--ade"}[key]
            raise ValueError(f"task {task!r} needs its data ({flag} DIR)")
        if not Path(path).is_dir():
            raise FileNotFoundError(f"{path}: no such data folder for task {task!r}")
        return Path(path)


@dataclass(frozen=True)
class Recipe:
    """One transfer recipe, identical for every backbone of a comparison.

    ``demo``: sized for the sample data on 2 CPU cores (small ViT, patch 8, 64 px classification,
    128 px scenes). ``paper``: the published recipes of our configs for real data
    (classification defaults, ``segmentation/configs``, ``detection/configs``).
    """

    name: str = "demo"
    arch: Arch = Arch.make("vit_tiny_patch16", depth=6, patch_size=8)
    img_size: int = 64
    # classification on few labels (10 per class in the sample data): small batches for a few
    # hundred steps; a tiny budget wants little regularisation (no mixup/cutmix/RandAug/smoothing)
    cls_epochs: int = 50
    cls_batch: int = 8
    cls_options: tuple[tuple[str, Any], ...] = (  # fine-tuning and partial fine-tuning
        ("mixup", 0.0), ("cutmix", 0.0), ("smoothing", 0.0), ("aa", "none"), ("reprob", 0.0),
        ("drop_path", 0.0), ("warmup_epochs", 5), ("layer_decay", 0.75), ("pool", "avg"), ("crop_scale", 0.7))
    finetune_blr: float = 1.6e-2  # lr 5e-4 at batch 8
    # crops keep >= 70% of the image: the sample objects' outline is their category
    linprobe_options: tuple[tuple[str, Any], ...] = (("warmup_epochs", 5), ("pool", "avg"), ("crop_scale", 0.7))
    linprobe_epochs: int = 60
    linprobe_batch: int = 8
    linprobe_blr: float = 200.0  # LARS: lr = 200 x 8 / 256 = 6.25, near the official 6.4 (0.1 x 16384 / 256)
    partial_blocks: int = 1
    # UperNet
    seg_size: int = 128
    seg_iters: int = 120
    seg_batch: int = 8
    seg_lr: float = 1e-3
    seg_layer_decay: float = 0.65
    # Mask R-CNN, ViTDet simple pyramid
    det_size: int = 128
    det_iters: int = 150
    det_batch: int = 4
    det_lr: float = 4e-4
    det_layer_decay: float = 0.7
    det_anchors: tuple[int, ...] = (16, 32, 64, 128, 256)

    @classmethod
    def demo(cls, quick: bool = False) -> "Recipe":
        if quick:
            return cls(arch=Arch.make("vit_tiny_patch16", depth=4, patch_size=8), cls_epochs=2, linprobe_epochs=2,
                       seg_iters=20, det_iters=20)
        return cls()

    @classmethod
    def paper(cls, arch: Arch) -> "Recipe":
        return cls(name="paper", arch=arch, img_size=224)

    def layer_decay(self, task: str, backbone: Backbone) -> float | None:
        """The layer decay of ``task`` for ``backbone`` (None: the paper recipe's value for the arch)."""
        if backbone.layer_decay is not None:
            return backbone.layer_decay
        if self.name == "paper":
            return None
        return {"segment": self.seg_layer_decay, "detect": self.det_layer_decay}.get(
            task, dict(self.cls_options).get("layer_decay"))


@dataclass
class TaskResult:
    """What one (backbone, task, seed) run gives back."""

    metrics: dict[str, float]
    curve: list[tuple[float, float]] = field(default_factory=list)  # (x, training loss)
    curve_unit: str = "iteration"
    examples: list[tuple[Path, Any]] = field(default_factory=list)  # (val image, prediction)
    note: str = ""
    notes: dict[str, str] = field(default_factory=dict)  # metric -> why it is 0 or NaN (e.g. no detections)
