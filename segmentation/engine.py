"""Train, test and infer with MMEngine's ``Runner``: what ``mae-transfer segment`` calls.

The recipe lives in the configs (``segmentation/configs``); these functions only load a config
(with checked ``--cfg-options``), apply the command-line switches, and run.
"""
from __future__ import annotations

import argparse
import inspect
import os
import os.path as osp
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from mmengine.config import Config, DictAction
from mmengine.runner import Runner
from mae_backbone.keys import did_you_mean, init_params

# keys Runner.from_cfg reads besides Runner.__init__'s arguments
_RUNNER_EXTRA_KEYS = {"custom_imports", "runner_type", "launcher", "env_cfg", "log_level", "tta_model", "tta_pipeline",
                      "model_wrapper_cfg", "find_unused_parameters", "sync_bn"}
CONFIG_DIR = Path(__file__).resolve().parent / "configs"


class ConfigError(ValueError):
    """A config or command-line option that cannot work; the message names the key."""


def parse_options(options: Sequence[str] | None) -> dict[str, Any]:
    """``["a.b=1", "c=[1,2]"]`` -> ``{"a.b": 1, "c": [1, 2]}``, with MMEngine's value syntax."""
    if not options:
        return {}
    bad = [o for o in options if "=" not in o]
    if bad:
        raise ConfigError(f"--cfg-options takes KEY=VALUE pairs, got {bad}")
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--o", nargs="+", action=DictAction)
    return dict(parser.parse_args(["--o", *options]).o)


def known_top_level_keys(cfg: Config) -> set[str]:
    """The config's own keys and every key the Runner reads."""
    runner_args = set(inspect.signature(Runner.__init__).parameters) - {"self"}
    return set(cfg.keys()) | runner_args | _RUNNER_EXTRA_KEYS


def load_config(path: str | os.PathLike, options: Sequence[str] | dict[str, Any] | None = None) -> Config:
    """Load an MMSeg config and merge ``--cfg-options``; an unknown top-level key is an error.

    Args:
        path: a config file (``_base_`` inheritance and ``custom_imports`` as usual).
        options: ``KEY=VALUE`` strings or a dict of dotted keys.
    Raises:
        ConfigError: a missing file, or an option whose first key neither the config nor the
            Runner knows (``optim_wraper.x=...``); a typo would otherwise be silently ignored.
    """
    import segmentation  # noqa: F401  (registers our modules for configs that do not import them)

    path = config_file(path)
    cfg = Config.fromfile(str(path))
    opts = options if isinstance(options, dict) else parse_options(options)
    known = known_top_level_keys(cfg)
    for key in opts:
        top = key.split(".")[0]
        if top not in known:
            raise ConfigError(f"--cfg-options: unknown top-level key {top!r} in {key!r}{did_you_mean(top, known)}")
    if opts:
        cfg.merge_from_dict(opts)
    check_model_keys(cfg.get("model"), str(path))
    check_runtime_keys(cfg, str(path))
    return cfg


def list_configs() -> list[str]:
    """The shipped config names (``segmentation/configs/*.py``, without ``_base_``)."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.py"))


def config_file(name: str | os.PathLike) -> Path:
    """A config path: an existing file as given, else a shipped one by name (with or without ``.py``).

    ``config_file("upernet-mae-vit-b_8xb2-160k_ade20k-512x512")`` -> ``.../segmentation/configs/...py``.

    Raises:
        ConfigError: neither a file nor a shipped name, with the closest shipped name.
    """
    path = Path(name)
    if path.is_file():
        return path
    for candidate in (CONFIG_DIR / path, CONFIG_DIR / f"{path}.py"):
        if len(path.parts) == 1 and candidate.is_file():
            return candidate
    shipped = list_configs()
    stem = path.name[:-3] if path.name.endswith(".py") else path.name
    raise ConfigError(f"{name}: no such config file, nor a shipped one{did_you_mean(stem, shipped)} "
                      f"(shipped: {', '.join(shipped)})")


def _check_typed(node: Any, where: str, cls: Any, source: str, allowed: Sequence[str] = ()) -> None:
    """Every key of the dict ``node`` (built as ``cls``) is one of ``cls``'s arguments or ``allowed``."""
    if not isinstance(node, dict) or not isinstance(cls, type):
        return
    known = init_params(cls)
    if known is None:  # takes **kwargs all the way up: nothing to check against
        return
    known = known | set(allowed)
    for key in node:
        if key not in ("type", "_scope_", "_delete_") and key not in known:
            raise ConfigError(f"{source}: unknown key {f'{where}.{key}'!r}: {cls.__name__} has no argument "
                              f"{key!r}{did_you_mean(key, known)}")


def _registered(registry: Any, node: Any, default: str | None = None) -> Any:
    kind = node.get("type", default) if isinstance(node, dict) else None
    return kind if isinstance(kind, type) else registry.get(kind) if isinstance(kind, str) else None


def check_runtime_keys(cfg: Config, source: str = "config") -> None:
    """The keys of the dicts MMEngine builds besides the model: loops (``train_cfg``), optimizer
    wrapper, optimizer and ``paramwise_cfg``, schedulers, hooks, dataloaders and datasets,
    evaluators; and every dataloader's ``batch_size`` / ``num_workers``.

    MMEngine would fail deep in the build (``TypeError: ... unexpected keyword 'max_iter'``) or,
    for ``paramwise_cfg``, ignore the key.  Classes taking ``**kwargs`` are not checked.

    Raises:
        ConfigError: naming the file, the dotted key and the closest valid argument or value.
    """
    import torch.utils.data
    from mmseg.registry import (DATASETS, HOOKS, LOOPS, METRICS, OPTIM_WRAPPER_CONSTRUCTORS, OPTIM_WRAPPERS,
                                OPTIMIZERS, PARAM_SCHEDULERS)

    loop_default = {"train_cfg": None, "val_cfg": "ValLoop", "test_cfg": "TestLoop"}
    for key, default in loop_default.items():
        loop = cfg.get(key)
        if isinstance(loop, dict):
            if default is None and "type" not in loop:
                default = "EpochBasedTrainLoop" if loop.get("by_epoch") else "IterBasedTrainLoop"
            _check_typed(loop, key, _registered(LOOPS, loop, default), source, allowed=("by_epoch",))
    wrapper = cfg.get("optim_wrapper")
    if isinstance(wrapper, dict):
        _check_typed(wrapper, "optim_wrapper", _registered(OPTIM_WRAPPERS, wrapper, "OptimWrapper"), source,
                     allowed=("optimizer", "constructor", "paramwise_cfg"))
        _check_typed(wrapper.get("optimizer"), "optim_wrapper.optimizer",
                     _registered(OPTIMIZERS, wrapper.get("optimizer")), source)
        constructor = OPTIM_WRAPPER_CONSTRUCTORS.get(wrapper.get("constructor", "DefaultOptimWrapperConstructor")) \
            if isinstance(wrapper.get("constructor", ""), str) else wrapper.get("constructor")
        paramwise, keys = wrapper.get("paramwise_cfg"), getattr(constructor, "PARAMWISE_KEYS", None)
        if isinstance(paramwise, dict) and keys is not None:
            for k in paramwise:
                if k not in keys:
                    raise ConfigError(f"{source}: unknown key {f'optim_wrapper.paramwise_cfg.{k}'!r}: "
                                      f"{constructor.__name__} reads {sorted(keys)}{did_you_mean(k, keys)}")
    schedulers = cfg.get("param_scheduler")
    for i, sched in enumerate(schedulers if isinstance(schedulers, (list, tuple)) else [schedulers]):
        where = f"param_scheduler[{i}]" if isinstance(schedulers, (list, tuple)) else "param_scheduler"
        _check_typed(sched, where, _registered(PARAM_SCHEDULERS, sched), source, allowed=("convert_to_iter_based",))
    for name, hook in (cfg.get("default_hooks") or {}).items():
        _check_typed(hook, f"default_hooks.{name}", _registered(HOOKS, hook), source)
    for i, hook in enumerate(cfg.get("custom_hooks") or []):
        _check_typed(hook, f"custom_hooks[{i}]", _registered(HOOKS, hook), source)
    loader_keys = set(inspect.signature(torch.utils.data.DataLoader.__init__).parameters) - {"self"}
    for name in ("train_dataloader", "val_dataloader", "test_dataloader"):
        loader = cfg.get(name)
        if not isinstance(loader, dict):
            continue
        for k in loader:
            if k not in loader_keys:
                raise ConfigError(f"{source}: unknown key {f'{name}.{k}'!r}: a dataloader has no argument "
                                  f"{k!r}{did_you_mean(k, loader_keys)}")
        for k, low in (("batch_size", 1), ("num_workers", 0)):
            value = loader.get(k)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
                raise ConfigError(f"{source}: {name}.{k} must be an integer >= {low}, got {value!r}")
        ds, where = loader.get("dataset"), f"{name}.dataset"
        while isinstance(ds, dict):  # through wrappers such as RepeatDataset
            _check_typed(ds, where, _registered(DATASETS, ds), source)
            ds, where = ds.get("dataset"), f"{where}.dataset"
    for name in ("val_evaluator", "test_evaluator"):
        ev = cfg.get(name)
        for i, metric in enumerate(ev if isinstance(ev, (list, tuple)) else [ev]):
            _check_typed(metric, name if not isinstance(ev, (list, tuple)) else f"{name}[{i}]",
                         _registered(METRICS, metric), source)


def check_model_keys(model: Any, source: str = "config") -> None:
    """Every key of a ``type=...`` dict in the model config is an argument of that class.

    MMEngine would otherwise fail deep in the build with a ``TypeError`` (or, for classes taking
    ``**kwargs``, ignore the key).  Dicts under ``*_cfg`` keys (``norm_cfg``, ``init_cfg``,
    ``train_cfg`` ...) are read by builders with their own keys and are not checked.

    Raises:
        ConfigError: naming the file, the dotted key and the closest valid argument.
    """
    from mmseg.registry import MODELS

    def visit(node: Any, path: str) -> None:
        if isinstance(node, dict):
            kind = node.get("type")
            cls = kind if isinstance(kind, type) else MODELS.get(kind) if isinstance(kind, str) else None
            known = init_params(cls) if isinstance(cls, type) else None
            if known is not None:
                for key in node:
                    if key not in ("type", "_scope_", "_delete_") and key not in known:
                        raise ConfigError(f"{source}: unknown key {f'{path}.{key}'!r}: {cls.__name__} has no "
                                          f"argument {key!r}{did_you_mean(key, known)}")
            for key, value in node.items():
                if not str(key).endswith("_cfg"):
                    visit(value, f"{path}.{key}")
        elif isinstance(node, (list, tuple)):
            for i, value in enumerate(node):
                visit(value, f"{path}[{i}]")

    visit(model, "model")


def _datasets(cfg: Config) -> list[Any]:
    found = []
    for loader in ("train_dataloader", "val_dataloader", "test_dataloader"):
        ds = (cfg.get(loader) or {}).get("dataset")
        while ds is not None:  # through wrappers such as RepeatDataset
            found.append(ds)
            ds = ds.get("dataset")
    return found


def set_data_root(cfg: Config, root: str | os.PathLike) -> None:
    """Point every dataset of the config at ``root`` (a folder in the ADEChallengeData2016 layout)."""
    for ds in _datasets(cfg):
        if "data_prefix" in ds or "data_root" in ds:
            ds["data_root"] = str(root)


def enable_amp(cfg: Config, dtype: str = "float16") -> None:
    """Mixed precision through MMEngine's ``AmpOptimWrapper`` (needs a GPU)."""
    import torch

    if not torch.cuda.is_available():
        raise ConfigError("--amp needs a GPU (MMEngine's AmpOptimWrapper supports CUDA/NPU/MLU devices only)")
    cfg.optim_wrapper.type = "AmpOptimWrapper"
    cfg.optim_wrapper.dtype = dtype
    if dtype == "float16":
        cfg.optim_wrapper.loss_scale = "dynamic"


def default_launcher() -> str:
    """``pytorch`` under ``torchrun`` (it sets ``LOCAL_RANK``), else ``none``."""
    return "pytorch" if "LOCAL_RANK" in os.environ else "none"


def prepare(cfg: Config, work_dir: str | None = None, launcher: str | None = None, config_path: str | None = None) -> Config:
    """Fill ``work_dir`` (default ``work_dirs/<config name>``) and ``launcher``."""
    if work_dir:
        cfg.work_dir = work_dir
    elif not cfg.get("work_dir"):
        name = osp.splitext(osp.basename(config_path or cfg.filename or "segment"))[0]
        cfg.work_dir = osp.join("work_dirs", name)
    cfg.launcher = launcher or default_launcher()
    add_reliability_hooks(cfg)
    return cfg


RELIABILITY_HOOKS = ("SafeCheckpointHook", "FiniteLossHook")


def add_reliability_hooks(cfg: Config) -> None:
    """What every run gets (``segmentation.safe_loading``), whatever its config says.

    - ``SafeCheckpointHook`` (plain-data checkpoints with a sha256) and ``FiniteLossHook`` (stop at
      the first non-finite loss, before a checkpoint of it) in ``custom_hooks``;
    - atomic checkpoint writes: the checkpoint hook's ``backend_args`` default to the
      ``atomic_local`` backend for a local ``out_dir``.
    """
    hooks = list(cfg.get("custom_hooks") or [])
    present = {h.get("type") for h in hooks}
    hooks += [dict(type=name) for name in RELIABILITY_HOOKS if name not in present]
    cfg.custom_hooks = hooks
    ckpt = (cfg.get("default_hooks") or {}).get("checkpoint")
    if ckpt is not None and not ckpt.get("backend_args") and not ckpt.get("file_client_args") \
            and "://" not in str(ckpt.get("out_dir") or ""):
        ckpt["backend_args"] = dict(backend="atomic_local")


def verify_checkpoint(path: str | os.PathLike) -> None:
    """Read a checkpoint the safe way before MMEngine does: refuse (``CheckpointError`` naming the
    file) a missing, truncated or bit-flipped one (sha256 of ``SafeCheckpointHook``) and one whose
    pickle would run code. Costs one extra read of the file."""
    from mae_backbone.io import CheckpointError, safe_torch_load

    if "://" in str(path):
        raise CheckpointError(f"{path}: a remote checkpoint is not loaded directly (its contents could not be "
                              "checked before use); download it and pass the local file")
    safe_torch_load(path)


def resume_checkpoint(work_dir: str | os.PathLike) -> str | None:
    """The checkpoint ``--resume`` (auto) continues from: the one ``WORK_DIR/last_checkpoint`` names.

    MMEngine writes ``last_checkpoint`` with a plain ``open(..., "w")``, so a run killed at that
    moment can leave it empty or cut; then the newest ``iter_*.pth`` / ``epoch_*.pth`` (each
    whole: written atomically) is used instead, with a warning.  None when there is nothing to
    resume from (the run starts from scratch, as MMEngine does).  Temporary files of writes that
    were killed midway are removed first.
    """
    import re

    from mmengine.logging import print_log

    work_dir = Path(work_dir)
    for stale in work_dir.glob(".*.pth.*.tmp"):  # left by a write that was killed midway
        stale.unlink(missing_ok=True)  # every process of a multi-GPU run cleans up
        print_log(f"removed {stale}, left by an interrupted checkpoint write", logger="current")
    tag = work_dir / "last_checkpoint"
    named = tag.read_text().strip() if tag.is_file() else ""
    if named:
        # MMEngine writes an absolute path: a copied or moved work dir would resume from the
        # original folder. A file of that name in this work dir (or a relative name) is used instead.
        here = work_dir / named if not osp.isabs(named) else work_dir / Path(named).name
        if here.is_file():
            if osp.isabs(named) and osp.realpath(named) != osp.realpath(here):
                print_log(f"{tag} names {named}, outside this work dir: resuming from {here}", logger="current",
                          level=30)
            return str(here)
    if named and osp.isfile(named) and not found_in(work_dir):
        print_log(f"{tag} names {named}, outside this work dir, which has no checkpoint: resuming from it",
                  logger="current", level=30)
        return named
    found = []
    for f in work_dir.glob("*.pth"):
        m = re.fullmatch(r"(?:iter|epoch)_(\d+)\.pth", f.name)
        if m:
            found.append((int(m.group(1)), str(f)))
    if not found:
        if named:
            raise ConfigError(f"{tag}: names {named}, which does not exist, and {work_dir} has no other "
                              "checkpoint to resume from")
        return None
    newest = max(found)[1]
    if tag.is_file():
        why = ("is empty (the run was probably killed while writing it)" if not named else
               f"names {named}, outside this work dir" if osp.isfile(named) else
               f"names a missing file {named!r} (the run was probably killed while writing it)")
        print_log(f"{tag} {why}: resuming from the newest checkpoint here, {newest}", logger="current", level=30)
    return newest


def found_in(work_dir: Path) -> bool:
    """Whether ``work_dir`` holds an ``iter_*.pth`` / ``epoch_*.pth`` checkpoint."""
    return any(work_dir.glob("iter_*.pth")) or any(work_dir.glob("epoch_*.pth"))


def _sync_bn_to_bn(node: Any) -> int:
    """Replace ``SyncBN`` norm configs by ``BN`` in place; returns how many."""
    count = 0
    if isinstance(node, dict):
        if node.get("type") == "SyncBN":
            node["type"] = "BN"
            count += 1
        for value in node.values():
            count += _sync_bn_to_bn(value)
    elif isinstance(node, (list, tuple)):
        count += sum(_sync_bn_to_bn(v) for v in node)
    return count


def setup_cpu_distributed(cfg: Config) -> None:
    """Make ``launcher='pytorch'`` work without GPUs (MMEngine 0.10 assumes CUDA there).

    MMEngine's ``init_dist`` calls ``torch.cuda.set_device`` and its DDP wrapper passes a CUDA
    ``device_ids``; ``SyncBatchNorm`` needs GPU tensors.  On a CPU-only machine under torchrun we
    therefore start the ``gloo`` process group ourselves, wrap with ``device_ids=None``, and use
    per-process ``BN`` (statistics are not synchronized; logged).  GPU runs are untouched.
    """
    import torch
    import torch.distributed as dist
    from mmengine.logging import print_log

    if cfg.get("launcher", "none") == "none" or torch.cuda.is_available():
        return
    if not dist.is_initialized():
        dist.init_process_group(backend="gloo")
    cfg.setdefault("model_wrapper_cfg", dict(type="MMDistributedDataParallel", broadcast_buffers=False))
    cfg.model_wrapper_cfg.setdefault("device_ids", None)
    if _sync_bn_to_bn(cfg.model):
        print_log("CPU distributed run: SyncBN replaced by per-process BN (SyncBN needs GPUs)",
                  logger="current", level=30)


def build_runner(cfg: Config) -> Runner:
    """``CheckedRunner`` (MMEngine's ``Runner`` with strict checkpoint loads, see
    ``segmentation.checkpoint``), or the config's ``runner_type``, which must derive from it."""
    from segmentation.checkpoint import CheckedRunner

    setup_cpu_distributed(cfg)
    if "runner_type" in cfg:
        from mmseg.registry import RUNNERS

        cls = RUNNERS.get(cfg.runner_type) if isinstance(cfg.runner_type, str) else cfg.runner_type
        if not (isinstance(cls, type) and issubclass(cls, CheckedRunner)):
            raise ConfigError(f"runner_type {cfg.runner_type!r} does not load checkpoints strictly (MMEngine's Runner "
                              "skips tensors that do not fit, with a warning); derive it from "
                              "segmentation.checkpoint.CheckedRunner")
        return RUNNERS.build(cfg)
    return CheckedRunner.from_cfg(cfg)


def train(cfg: Config, resume: str | bool = False) -> Runner:
    """Train as the config says.

    Args:
        cfg: a loaded, prepared config.
        resume: False, True / ``"auto"`` (latest checkpoint in ``work_dir``, see
            ``resume_checkpoint``), or a checkpoint path. The checkpoint (or ``load_from``) is
            verified first (``verify_checkpoint``).
    Returns:
        the runner after training (``runner.iter``, ``runner.model``, ``runner.message_hub``).
    """
    if resume:
        path = resume_checkpoint(cfg.work_dir) if resume in (True, "auto") else str(resume)
        if path is not None:
            cfg.resume = True
            cfg.load_from = path
    if cfg.get("load_from"):  # what MMEngine will load: the resume checkpoint, or the config's load_from
        verify_checkpoint(cfg.load_from)
    runner = build_runner(cfg)
    runner.train()
    return runner


@dataclass
class TestResult:
    """Summary metrics (``aAcc``, ``mIoU``, ``mAcc`` in %), ``{class: {"IoU": %, "Acc": %}}`` and
    the checkpoint's load report (what was loaded and resampled)."""

    metrics: dict[str, float]
    per_class: dict[str, dict[str, float]] = field(default_factory=dict)
    checkpoint: Any = None

    def table(self) -> str:
        """The per-class table as plain text."""
        if not self.per_class:
            return "(no per-class results: the evaluator is not an IoUMetric)"
        cols = list(next(iter(self.per_class.values())))
        width = max(len("class"), *(len(c) for c in self.per_class))
        lines = [f"{'class':<{width}}  " + "  ".join(f"{c:>7}" for c in cols)]
        for name, row in self.per_class.items():
            lines.append(f"{name:<{width}}  " + "  ".join(f"{row[c]:7.2f}" for c in cols))
        return "\n".join(lines)


def test(cfg: Config, checkpoint: str) -> TestResult:
    """Evaluate a checkpoint on the config's test set.

    The checkpoint is loaded strictly (``segmentation.checkpoint``): one that does not fit the
    config's model raises ``CheckpointError`` naming the keys, before anything is evaluated.
    A plain ``IoUMetric`` evaluator is run as ``PerClassIoUMetric`` (same arguments) so that the
    per-class numbers come back, not only into the log.
    """
    from segmentation.metrics import PerClassIoUMetric

    if not osp.isfile(checkpoint):
        raise ConfigError(f"no such checkpoint file: {checkpoint}")
    verify_checkpoint(checkpoint)
    evaluators = cfg.test_evaluator if isinstance(cfg.test_evaluator, list) else [cfg.test_evaluator]
    for ev in evaluators:
        if ev.get("type") == "IoUMetric":
            ev["type"] = "PerClassIoUMetric"
    cfg.load_from = checkpoint
    cfg.resume = False
    runner = build_runner(cfg)
    metrics = runner.test()
    per_class: dict[str, dict[str, float]] = {}
    for metric in runner.test_evaluator.metrics:
        if isinstance(metric, PerClassIoUMetric):
            per_class = metric.per_class
    return TestResult(metrics={k: float(v) for k, v in metrics.items()}, per_class=per_class,
                      checkpoint=getattr(runner, "checkpoint_report", None))


def dataset_meta(checkpoint: dict, model: Any) -> dict[str, Any]:
    """Class names and palette: the checkpoint's ``meta.dataset_meta`` (MMEngine stores it), else
    (older MMSeg files) ``meta.CLASSES``/``PALETTE``, else MMSeg's fallback: the first dataset with
    as many classes as the decode head, logged."""
    from mmengine.logging import print_log

    meta = checkpoint.get("meta") or {}
    if "dataset_meta" in meta:
        return meta["dataset_meta"]
    if "CLASSES" in meta:
        return {"classes": meta["CLASSES"], "palette": meta["PALETTE"]}
    from mmseg.utils import dataset_aliases, get_classes, get_palette

    num = model.decode_head.num_classes
    name = next((n for n in dataset_aliases if len(get_classes(n)) == num), "cityscapes")
    print_log(f"the checkpoint names no classes (meta.dataset_meta): using {name}'s {len(get_classes(name))} "
              "class names and palette", logger="current", level=30)
    return {"classes": get_classes(name), "palette": get_palette(name)}


def read_image(path: str) -> np.ndarray:
    """An image as MMSeg's ``LoadImageFromFile`` reads it (OpenCV, 8-bit BGR).

    Raises:
        DatasetError: naming the file: empty, not an image, too many pixels, or cut short.
    """
    import mmcv

    from segmentation.datasets import DatasetError, image_size

    image_size(path)  # the header: empty file, not an image, decompression bomb
    bgr = mmcv.imread(path)
    if bgr is None:
        raise DatasetError(f"{path}: not a readable image (its header is fine but the pixels cannot be decoded: "
                           "the file is probably cut short)")
    return bgr


@dataclass
class InferResult:
    """Class index per pixel [H, W] and the share of pixels per predicted class (%)."""

    pred: np.ndarray
    shares: dict[str, float]


def infer(cfg: Config, checkpoint: str, image: str, out: str, device: str | None = None,
          opacity: float = 0.5) -> InferResult:
    """Segment one image and write a colour overlay PNG (the dataset palette blended onto it).

    Args:
        cfg: a loaded config (its ``test_pipeline`` and ``model.test_cfg``, e.g. slide inference).
        checkpoint: a model checkpoint of ``segment train``.
        image: the input image file.
        out: the PNG to write (its folder is created).
        device: ``cuda:0`` when available, else ``cpu``, by default.
        opacity: weight of the class colours in the blend.
    """
    import torch
    from mmseg.apis import inference_model, init_model
    from PIL import Image

    from mae_backbone.io import atomic_write, safe_torch_load
    from segmentation.checkpoint import load_segmentor_state

    for what, path in (("checkpoint", checkpoint), ("image", image)):
        if not osp.isfile(path):
            raise ConfigError(f"no such {what} file: {path}")
    if not 0.0 <= opacity <= 1.0:
        raise ConfigError(f"opacity must be in [0, 1], got {opacity}")
    read_image(image)  # a bad image is refused before the model is built
    state = safe_torch_load(checkpoint)  # weights_only, sha256 verified when the file has one
    device = device or ("cuda:0" if torch.cuda.is_available() else "cpu")
    model = init_model(cfg, None, device="cpu")  # MMSeg's loader is not strict: load it ourselves
    load_segmentor_state(model, state, str(checkpoint))
    model.dataset_meta = dataset_meta(state, model)
    model.to(device)
    bgr = read_image(image)  # as MMSeg's pipeline reads it; passed as an array, read once
    result = inference_model(model, bgr)
    pred = result.pred_sem_seg.data[0].cpu().numpy().astype(np.int64)
    classes = list(model.dataset_meta["classes"])
    palette = np.asarray(model.dataset_meta["palette"], dtype=np.float32).reshape(-1, 3)
    rgb = bgr[..., ::-1].astype(np.float32)
    blend = rgb * (1 - opacity) + palette[pred % len(palette)] * opacity
    overlay = Image.fromarray(np.clip(blend.round(), 0, 255).astype(np.uint8))
    atomic_write(out, lambda tmp: overlay.save(tmp, format="PNG"))
    ids, counts = np.unique(pred, return_counts=True)
    order = np.argsort(-counts)
    shares = {classes[ids[i]] if ids[i] < len(classes) else str(ids[i]): 100.0 * counts[i] / pred.size
              for i in order}
    return InferResult(pred=pred, shares=shares)
