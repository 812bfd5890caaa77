"""Train, evaluate and infer with Detectron2's own machinery, for LazyConfig and yacs configs alike.

LazyConfig (``.py``, the recipes): ``do_train`` is Detectron2's ``lazyconfig_train_net`` loop:
``SimpleTrainer`` / ``AMPTrainer``, DDP through ``create_ddp_model``, hooks for the LR schedule,
periodic checkpoints, periodic COCO evaluation and writers (console with ETA, TensorBoard,
``metrics.json``), resume through the checkpointer. A resumed LazyConfig run continues exactly where
the checkpoint was taken (``ResumableLoader``, ``RandomState``): on one CPU process its weights
equal an uninterrupted run's bit for bit. yacs (``.yaml``): ``ViTTrainer``, a
``DefaultTrainer`` with our optimizer, evaluator and safe checkpointer.

Both paths load detector weights with ``SafeDetectionCheckpointer`` and check datasets, class
counts, device and AMP before any work starts.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from detectron2.config import CfgNode, instantiate
from detectron2.data import MetadataCatalog
from detectron2.data import detection_utils
from detectron2.data import transforms as T
from detectron2.engine import AMPTrainer, DefaultTrainer, SimpleTrainer, default_setup, default_writers, hooks
from detectron2.engine.defaults import create_ddp_model
from detectron2.evaluation import inference_on_dataset, print_csv_format
from detectron2.solver.build import maybe_add_gradient_clipping
from detectron2.structures import Instances
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger
from detectron2.utils.registry import locate
from detectron2.utils.visualizer import ColorMode, Visualizer
from omegaconf import DictConfig, ListConfig
from torch import nn

from detection.backbone import SimpleFeaturePyramid, ViTMultiScale
from detection.checkpoint import SafeDetectionCheckpointer
from detection.config import CONFIG_DIR, ConfigError, get_config_file, is_lazy, load_config
from detection.data import (CompleteCOCOEvaluator, DatasetError, NamingMapper, build_coco_evaluator, check_dataset,
                            check_image, dataset_num_classes, register_coco_dataset)
from detection.optim import get_vit_param_groups
from mae_backbone import CheckpointError
from training.errors import check_output_dir, check_output_file

logger = logging.getLogger(f"detectron2.{__name__}")  # shown by Detectron2's setup_logger()


@dataclass
class RunOptions:
    """What the ``detect`` commands pass down (picklable, for Detectron2's ``launch``)."""

    config: str
    overrides: list[str] = field(default_factory=list)
    output: str | None = None
    resume: bool = False
    trust_pickle: bool = False
    register: list[tuple[str, str, str]] = field(default_factory=list)  # (name, json, image_root)
    weights: str | None = None
    debug: bool = False  # keep the tracebacks Detectron2 logs for a user's mistake (mae-transfer --debug)


# --------------------------------------------------------------------------- config access
def _get(cfg: Any, lazy_key: str, yacs_key: str) -> Any:
    node = cfg
    for part in (lazy_key if is_lazy(cfg) else yacs_key).split("."):
        node = node[part] if isinstance(node, (DictConfig, dict)) else getattr(node, part)
    return node


def _set(cfg: Any, lazy_key: str, yacs_key: str, value: Any) -> None:
    key = lazy_key if is_lazy(cfg) else yacs_key
    parent, _, leaf = key.rpartition(".")
    node = _get(cfg, parent, parent) if parent else cfg
    if isinstance(cfg, CfgNode):
        cfg.defrost()
        setattr(node, leaf, value)
    else:
        node[leaf] = value


def output_dir(cfg: Any) -> str:
    return _get(cfg, "train.output_dir", "OUTPUT_DIR")


def _names(value: Any) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


def dataset_names(cfg: Any, split: str) -> list[str]:
    """The dataset names a config trains (``split="train"``) or tests on."""
    if is_lazy(cfg):
        loader = cfg.dataloader.get(split)
        return _names(loader.dataset.names) if loader is not None else []
    return list(cfg.DATASETS.TRAIN if split == "train" else cfg.DATASETS.TEST)


def _num_classes(cfg: Any) -> int | None:
    if is_lazy(cfg):
        heads = cfg.model.get("roi_heads")
        return heads.get("num_classes") if heads is not None else None
    return cfg.MODEL.ROI_HEADS.NUM_CLASSES


def check_config(cfg: Any, splits: Sequence[str] = ("train", "test")) -> None:
    """Fail early: datasets registered and on disk, class counts matching the model's.

    Also picks the device: a config asking for CUDA on a machine without it runs on the CPU
    (with a warning), and AMP, which Detectron2's ``AMPTrainer`` only does on CUDA, is turned off
    there (with a warning).
    """
    for split in splits:
        names = dataset_names(cfg, split)
        check_dataset(names)
        model_classes = _num_classes(cfg)
        for name in names:
            n = dataset_num_classes(name)
            if model_classes is not None and n is not None and n != model_classes:
                key = "model.roi_heads.num_classes" if is_lazy(cfg) else "MODEL.ROI_HEADS.NUM_CLASSES"
                raise ConfigError(f"dataset {name!r} has {n} classes but the model predicts {model_classes}: "
                                 f"add {key}={n}")
    device = str(_get(cfg, "train.device", "MODEL.DEVICE"))
    if device.startswith("cuda") and not torch.cuda.is_available():
        logger.warning("the config asks for %s but CUDA is not available: running on the CPU", device)
        _set(cfg, "train.device", "MODEL.DEVICE", "cpu")
    if _get(cfg, "train.amp.enabled", "SOLVER.AMP.ENABLED") and not torch.cuda.is_available():
        logger.warning("AMP is on in the config, but Detectron2's AMPTrainer needs CUDA: training in fp32")
        _set(cfg, "train.amp.enabled", "SOLVER.AMP.ENABLED", False)


def eval_output_dir(weights: str) -> Path:
    """Where ``detect eval`` writes without ``--output``: ``eval_<weights stem>`` beside the weights file
    (``OUTPUT/model_final.pth`` -> ``OUTPUT/eval_model_final/``), so that an evaluation lands with the
    run it evaluates, leaves the run's own ``config.yaml`` and ``log.txt`` as they were, and writes
    nothing into the current folder.

    Raises:
        ConfigError: the weights are not a local file (a URL): ``--output`` is needed.
    """
    if "://" in weights:
        raise ConfigError(f"--weights {weights} is not a local file: pass --output FOLDER for the evaluation's "
                          "results and logs")
    path = Path(weights)
    return path.parent / f"eval_{path.stem}"


def check_weights_file(weights: str) -> None:
    """A local detector checkpoint must be a file (URLs and ``detectron2://`` model-zoo names are left
    to Detectron2's ``PathManager``).

    Raises:
        CheckpointError: naming the path: missing, or a folder (with the file it probably meant).
    """
    if "://" in weights:
        return
    path = Path(weights)
    if path.is_dir():
        hint = ""
        if (path / "model_final.pth").is_file():
            hint = f" (did you mean {path / 'model_final.pth'}?)"
        elif (path / "last_checkpoint").is_file():  # a run still training: its newest checkpoint
            hint = f" (did you mean {path / (path / 'last_checkpoint').read_text().strip()}?)"
        raise CheckpointError(f"weights {path}: is a folder, not a checkpoint file{hint}")
    if not path.is_file():
        raise CheckpointError(f"weights {path}: no such checkpoint file")


def _log_files(name: str) -> list[logging.Handler]:
    """The handlers of logger ``name`` that write the ``log.txt`` files ``setup_logger`` opened."""
    return [h for h in logging.getLogger(name).handlers
            if os.path.basename(str(getattr(getattr(h, "stream", None), "name", ""))).startswith("log.txt")]


class QuietUserErrors(logging.Filter):
    """Drop the traceback of a user's mistake from Detectron2's ``Exception during training`` record.

    ``TrainerBase.train`` logs every exception with its traceback before re-raising it; a mistake
    the user can fix (an image that turns out truncated when training decodes it, a dataset or
    config error, a checkpoint problem) is then reported once, as one line naming the file, by
    ``mae-transfer``'s error boundary. ``--debug`` keeps the tracebacks.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, (DatasetError, ConfigError, CheckpointError)):
            record.msg = f"{record.getMessage()} {type(exc).__name__}: {exc}"
            record.args, record.exc_info, record.exc_text = None, None, None
        return True


def quiet_user_errors(enable: bool = True) -> None:
    """Put ``QuietUserErrors`` on Detectron2's train-loop logger once (or take it off)."""
    log = logging.getLogger("detectron2.engine.train_loop")
    for f in [f for f in log.filters if isinstance(f, QuietUserErrors)]:
        log.removeFilter(f)
    if enable:
        log.addFilter(QuietUserErrors())


def reset_detectron2_logging() -> None:
    """Take off the console and file handlers that earlier runs in this process added to Detectron2's
    and fvcore's loggers, so that the next ``default_setup`` leaves exactly one of each.

    Detectron2's ``setup_logger`` is cached on its arguments and adds a console and a file handler
    for every new output folder: a second run in one process (the demo trains two detectors, then
    evaluates) would print each line twice and write it into the first run's ``log.txt`` too. The
    log files these handlers opened are closed.
    """
    from detectron2.utils import logger as d2_logger

    for name in ("detectron2", "fvcore"):
        log = logging.getLogger(name)
        files = _log_files(name)
        for handler in list(log.handlers):
            log.removeHandler(handler)
            if handler in files and not handler.stream.closed:  # one stream may serve both loggers
                handler.flush()
                handler.stream.close()
    d2_logger.setup_logger.cache_clear()
    d2_logger._cached_log_stream.cache_clear()


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class PlainFormatter(logging.Formatter):
    """A log file's formatter without ANSI colour codes: Detectron2's ``default_setup`` logs the config
    file highlighted for a terminal, and its file handler would keep the codes."""

    def __init__(self, inner: logging.Formatter | None):
        super().__init__()
        self.inner = inner or logging.Formatter()

    def format(self, record: logging.LogRecord) -> str:
        return _ANSI.sub("", self.inner.format(record))


def _is_shipped(config: str) -> bool:
    """Whether ``config`` names one of the recipes in ``detection/configs`` (not a user's own file)."""
    try:
        return CONFIG_DIR.resolve() in get_config_file(config).resolve().parents
    except FileNotFoundError:
        return False


def setup(opts: RunOptions, eval_only: bool = False) -> Any:
    """Register datasets, load the config with overrides, check the config (``check_config``) and the
    output folder, then set up the output folder and logs: a mistake changes nothing on disk.

    ``detect eval`` without ``--output`` writes beside its weights (``eval_output_dir``); ``detect train``
    of a shipped recipe needs ``--output`` (or a ``train.output_dir=`` override): the recipes' own
    ``./output`` would land in the current folder unasked.

    Raises:
        ConfigError, UserError, CheckpointError: before any work, naming the key or path.
    """
    for name, json_file, image_root in opts.register:
        register_coco_dataset(name, json_file, image_root)
    cfg = load_config(opts.config, opts.overrides)
    if eval_only:
        weights = opts.weights or _get(cfg, "train.init_checkpoint", "MODEL.WEIGHTS")
        if not weights:
            raise ConfigError("no detector weights to evaluate: pass --weights PATH (e.g. OUTPUT/model_final.pth)")
        check_weights_file(weights)
    if opts.output:
        _set(cfg, "train.output_dir", "OUTPUT_DIR", opts.output)
    elif eval_only:
        _set(cfg, "train.output_dir", "OUTPUT_DIR", str(eval_output_dir(weights)))
    elif _is_shipped(opts.config) and not any(o.split("=", 1)[0] in ("train.output_dir", "OUTPUT_DIR")
                                               for o in opts.overrides):
        raise ConfigError(f"{opts.config}: give --output FOLDER (the shipped recipe's output folder is "
                          f"{output_dir(cfg)!r}, in the current folder); nothing is written there unasked")
    check_output_dir(output_dir(cfg), "--output" if opts.output else
                     ("output folder" if eval_only else "output folder (train.output_dir / OUTPUT_DIR)"))
    # datasets and class counts before default_setup writes config.yaml / log.txt into the output folder
    check_config(cfg, splits=("test",) if eval_only else ("train", "test"))
    args = argparse.Namespace(config_file=str(get_config_file(opts.config)), opts=list(opts.overrides),
                              eval_only=eval_only, resume=opts.resume)
    reset_detectron2_logging()
    quiet_user_errors(not opts.debug)
    # the loggers default_setup sets up, made first with its arguments (setup_logger is cached on them, so
    # default_setup gets these), so that their log files are plain text from its first record on
    rank = comm.get_rank()
    setup_logger(output_dir(cfg), distributed_rank=rank, name="fvcore")
    setup_logger(output_dir(cfg), distributed_rank=rank)
    for name in ("detectron2", "fvcore"):
        for handler in _log_files(name):
            handler.setFormatter(PlainFormatter(handler.formatter))
    default_setup(cfg, args)
    for name in ("detectron2", "fvcore"):  # one handler per destination, whatever default_setup did
        log, seen = logging.getLogger(name), set()
        for handler in list(log.handlers):
            key = id(getattr(handler, "stream", handler))
            if key in seen:
                log.removeHandler(handler)
            seen.add(key)
    return cfg


# --------------------------------------------------------------------------- models
def _is_ours(target: Any) -> bool:
    names = {f"{c.__module__}.{c.__qualname__}" for c in (SimpleFeaturePyramid, ViTMultiScale)}
    return target in (SimpleFeaturePyramid, ViTMultiScale) or target in names


def skip_pretrained(cfg: Any) -> None:
    """Stop the backbone loading its encoder checkpoint: detector weights are about to replace it."""
    if not is_lazy(cfg):
        if cfg.MODEL.VIT.PRETRAINED:
            logger.info("not loading MODEL.VIT.PRETRAINED: the detector weights replace it")
        cfg.defrost()
        cfg.MODEL.VIT.PRETRAINED = ""
        return

    def visit(node: Any) -> None:
        if isinstance(node, DictConfig):
            if "pretrained" in node and _is_ours(node.get("_target_")):
                if node.pretrained:
                    logger.info("not loading %s: the detector weights replace it", node.pretrained)
                node.pretrained = ""
            for key in node.keys():
                visit(node._get_node(key))
        elif isinstance(node, ListConfig):
            for i in range(len(node)):
                visit(node._get_node(i))

    visit(cfg.model)


def build_model(cfg: Any) -> nn.Module:
    """The detector a config describes, on its device (weights: initialization + ``pretrained``)."""
    if is_lazy(cfg):
        return instantiate(cfg.model).to(cfg.train.device)
    return ViTTrainer.build_model(cfg)


def load_trained_model(cfg: Any, weights: str | None, trust_pickle: bool = False) -> nn.Module:
    """A detector in eval mode with trained weights (``weights``, else the config's own)."""
    weights = weights or _get(cfg, "train.init_checkpoint", "MODEL.WEIGHTS")
    if not weights:
        raise ConfigError("no detector weights to evaluate: pass --weights PATH (e.g. OUTPUT/model_final.pth)")
    check_weights_file(weights)
    skip_pretrained(cfg)
    model = build_model(cfg)
    SafeDetectionCheckpointer(model, trust_pickle=trust_pickle).load(weights)
    return model.eval()


def build_vit_optimizer(cfg: CfgNode, model: nn.Module) -> torch.optim.Optimizer:
    """yacs: ``SOLVER.OPTIMIZER`` (``ADAMW`` / ``SGD``) over layer-decayed groups (``MODEL.VIT.LAYER_DECAY``),
    with ViTDet's weight-decay rule (``SOLVER.WEIGHT_DECAY_NORM``, ``MODEL.VIT.NO_WEIGHT_DECAY``)."""
    s = cfg.SOLVER
    ignored = [k for k, unset in (("WEIGHT_DECAY_BIAS", None), ("BIAS_LR_FACTOR", 1.0)) if s.get(k, unset) != unset]
    if ignored:
        raise ConfigError(f"SOLVER.{ignored[0]} is not read by the ViT optimizer (ViTDet's rule: biases are decayed "
                          "like weights, at the layer-decayed lr); remove it")
    groups = get_vit_param_groups(model, s.BASE_LR, s.WEIGHT_DECAY, cfg.MODEL.VIT.LAYER_DECAY,
                                  weight_decay_norm=s.WEIGHT_DECAY_NORM,
                                  no_weight_decay=list(cfg.MODEL.VIT.NO_WEIGHT_DECAY))
    kind = s.OPTIMIZER.upper()
    if kind == "ADAMW":
        opt: torch.optim.Optimizer = torch.optim.AdamW(groups, lr=s.BASE_LR, betas=(0.9, 0.999),
                                                       weight_decay=s.WEIGHT_DECAY)
    elif kind == "SGD":
        opt = torch.optim.SGD(groups, lr=s.BASE_LR, momentum=s.MOMENTUM, nesterov=s.NESTEROV)
    else:
        raise ValueError(f"SOLVER.OPTIMIZER must be ADAMW or SGD, not {s.OPTIMIZER!r}")
    return maybe_add_gradient_clipping(cfg, opt)


class ViTTrainer(DefaultTrainer):
    """``DefaultTrainer`` for yacs configs using ``build_mae_vit_backbone``.

    Differences: AdamW with layer-wise lr decay (``build_vit_optimizer``), ``COCOEvaluator`` that
    works without Detectron2's C++ ops, and ``SafeDetectionCheckpointer`` for resume and weights.
    """

    def __init__(self, cfg: CfgNode, trust_pickle: bool = False):
        self._trust_pickle = trust_pickle  # read by build_hooks, which DefaultTrainer.__init__ calls
        super().__init__(cfg)

    @classmethod
    def build_optimizer(cls, cfg: CfgNode, model: nn.Module) -> torch.optim.Optimizer:
        return build_vit_optimizer(cfg, model)

    @classmethod
    def build_evaluator(cls, cfg: CfgNode, dataset_name: str, output_folder: str | None = None):
        evaluator = build_coco_evaluator(dataset_name, output_folder or os.path.join(cfg.OUTPUT_DIR, "inference"))
        evaluator.expected_tasks = ("bbox", "segm") if cfg.MODEL.MASK_ON else ("bbox",)
        return evaluator

    def build_hooks(self) -> list:
        self.checkpointer = SafeDetectionCheckpointer.replacing(self.checkpointer, self._trust_pickle)
        return super().build_hooks()

    def resume_or_load(self, resume: bool = True) -> None:
        if resume and comm.is_main_process():
            self.checkpointer.remove_stale_temporaries()
        super().resume_or_load(resume=resume)


# --------------------------------------------------------------------------- LazyConfig loop
class RandomState:
    """The process's random generators (torch, numpy, Python) as a checkpointable.

    ``state_dict`` captures them when a checkpoint is written; ``load_state_dict`` only keeps the
    state, which ``ResumableLoader`` applies once the data loader has been brought back to the
    checkpoint's iteration (replaying it consumes the generators too). Plain tensors and numbers,
    so the checkpoint still loads with ``weights_only``.
    """

    def __init__(self) -> None:
        self.pending: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        _, keys, pos, has_gauss, cached = np.random.get_state()
        version, internal, gauss = random.getstate()
        return {"torch": torch.get_rng_state(),
                "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                          "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
                "python": {"version": version, "internal": torch.tensor(internal, dtype=torch.int64),
                           "gauss": gauss}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.pending = state

    def restore(self) -> None:
        """Apply the loaded state (no-op when none was loaded, and in multi-process runs: the
        checkpoint holds rank 0's generators only, and every rank needs its own)."""
        if self.pending is None:
            return
        s, self.pending = self.pending, None
        if comm.get_world_size() > 1:
            logger.info("resume: random generators not restored (multi-process run; the checkpoint holds rank 0's)")
            return
        torch.set_rng_state(s["torch"])
        n = s["numpy"]
        np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                             n["cached_gaussian"]))
        p = s["python"]
        random.setstate((p["version"], tuple(int(v) for v in p["internal"].tolist()), p["gauss"]))


class ResumableLoader:
    """A training data loader that, on resume, first replays the batches already trained on.

    Detectron2 restarts its infinite sampler (and the augmentations' random draws) from the
    beginning on resume, so a resumed run would see other batches than an uninterrupted one.
    Replaying ``skip`` batches (as MMEngine's ``IterBasedTrainLoop`` does) brings the sampler and
    the loading pipeline to the checkpoint's position; ``random_state.restore()`` then puts the
    generators where they were when the checkpoint was written. Replay costs the data loading of
    the skipped iterations (no model work).
    """

    def __init__(self, loader: Any, random_state: RandomState):
        self.loader, self.random_state, self.skip = loader, random_state, 0

    def __iter__(self):
        it = iter(self.loader)
        if self.skip:
            logger.info("resume: replaying %d batches of the data loader to reach the checkpoint", self.skip)
        for _ in range(self.skip):
            next(it)
        self.random_state.restore()
        yield from it


def _naming_loader(loader_cfg: Any) -> Any:
    """The loader a LazyConfig node describes, with its mapper wrapped in ``NamingMapper``
    (instantiated as ``instantiate`` would, in place, so the config's interpolations resolve)."""
    if not (isinstance(loader_cfg, DictConfig) and "_target_" in loader_cfg and loader_cfg.get("mapper") is not None):
        return instantiate(loader_cfg)
    kwargs = {k: instantiate(v) for k, v in loader_cfg.items() if k not in ("_target_", "mapper")}
    target = loader_cfg._target_
    target = locate(target) if isinstance(target, str) else target
    return target(mapper=NamingMapper(instantiate(loader_cfg.mapper)), **kwargs)


def model_tasks(model: nn.Module) -> tuple[str, ...]:
    """The COCO tasks a detector predicts: ``("bbox", "segm")`` with a mask head, else ``("bbox",)``."""
    model = getattr(model, "module", model)  # DistributedDataParallel
    return ("bbox", "segm") if getattr(getattr(model, "roi_heads", None), "mask_on", False) else ("bbox",)


def evaluate(cfg: Any, model: nn.Module) -> tuple[dict[str, Any], dict[str, str]]:
    """COCO evaluation of ``model`` on the config's test set: ``({"bbox": {"AP": ...}, "segm": {...}}, notes)``.

    With ``CompleteCOCOEvaluator`` (the shipped configs') every task the model predicts is in the
    result, also when it detected nothing; ``notes`` (``{task: why}``) says why a number is 0 or NaN.
    """
    if not is_lazy(cfg):
        evaluators = [ViTTrainer.build_evaluator(cfg, name) for name in cfg.DATASETS.TEST]
        results = ViTTrainer.test(cfg, model, evaluators)
    else:
        evaluators = [instantiate(cfg.dataloader.evaluator)]
        if isinstance(evaluators[0], CompleteCOCOEvaluator):
            evaluators[0].expected_tasks = model_tasks(model)
        results = inference_on_dataset(model, _naming_loader(cfg.dataloader.test), evaluators[0])
        if comm.is_main_process():
            print_csv_format(results)
    return results, {task: note for e in evaluators for task, note in getattr(e, "notes", {}).items()}


def do_test(cfg: Any, model: nn.Module) -> dict[str, Any]:
    """``evaluate``'s results alone (what Detectron2's ``EvalHook`` takes: numbers only)."""
    return evaluate(cfg, model)[0]


def do_train(cfg: DictConfig, resume: bool = False, trust_pickle: bool = False) -> SimpleTrainer:
    """Detectron2's LazyConfig training loop; returns the finished trainer (its ``storage`` holds
    the metric history)."""
    model = instantiate(cfg.model).to(cfg.train.device)
    logger.info("model:\n%s", model)
    cfg.optimizer.params.model = model
    optimizer = instantiate(cfg.optimizer)
    random_state = RandomState()
    train_loader = ResumableLoader(_naming_loader(cfg.dataloader.train), random_state)
    model = create_ddp_model(model, **cfg.train.ddp)
    trainer = (AMPTrainer if cfg.train.amp.enabled else SimpleTrainer)(model, train_loader, optimizer)
    # train.init_checkpoint_skip: keys of init_checkpoint to leave at their initialization (explicit partial
    # load, e.g. a detector trained for other classes); everything else must fit
    checkpointer = SafeDetectionCheckpointer(model, cfg.train.output_dir, trust_pickle=trust_pickle, trainer=trainer,
                                             random_state=random_state,
                                             skip_keys=list(cfg.train.get("init_checkpoint_skip") or ()))
    main = comm.is_main_process()
    trainer.register_hooks([
        hooks.IterationTimer(),
        hooks.LRScheduler(scheduler=instantiate(cfg.lr_multiplier)),
        hooks.PeriodicCheckpointer(checkpointer, **cfg.train.checkpointer) if main else None,
        hooks.EvalHook(cfg.train.eval_period, lambda: do_test(cfg, model)),
        hooks.PeriodicWriter(default_writers(cfg.train.output_dir, cfg.train.max_iter),
                             period=cfg.train.log_period) if main else None,
    ])
    if resume and main:
        checkpointer.remove_stale_temporaries()
    checkpointer.resume_or_load(cfg.train.init_checkpoint, resume=resume)
    start_iter = trainer.iter + 1 if resume and checkpointer.has_checkpoint() else 0
    train_loader.skip = start_iter
    trainer.train(start_iter, cfg.train.max_iter)
    prefix = cfg.train.checkpointer.get("file_prefix", "model")
    if main and start_iter >= cfg.train.max_iter and not checkpointer.path_manager.exists(
            os.path.join(cfg.train.output_dir, f"{prefix}_final.pth")):
        # the run had finished its last iteration but was killed before (or while) writing the
        # final checkpoint: the last periodic one holds the same state
        checkpointer.save(f"{prefix}_final", iteration=cfg.train.max_iter - 1)
    return trainer


# --------------------------------------------------------------------------- entry points
def train_main(opts: RunOptions) -> Any:
    """``detect train`` in one process (Detectron2's ``launch`` runs it once per GPU)."""
    cfg = setup(opts)  # checks the config (check_config) before writing anything
    if is_lazy(cfg):
        return do_train(cfg, resume=opts.resume, trust_pickle=opts.trust_pickle)
    trainer = ViTTrainer(cfg, trust_pickle=opts.trust_pickle)
    trainer.resume_or_load(resume=opts.resume)
    return trainer.train()


def eval_main(opts: RunOptions) -> dict[str, Any]:
    """``detect eval``: COCO AP of trained weights (and ``"notes"``: why a number is 0 or NaN, when
    one is); also written to ``OUTPUT/eval_results.json``."""
    cfg = setup(opts, eval_only=True)
    model = load_trained_model(cfg, opts.weights, opts.trust_pickle)
    results, notes = evaluate(cfg, create_ddp_model(model))
    if notes:  # why a number is 0 or NaN (e.g. no detections), beside the numbers
        results = {**results, "notes": notes}
    if comm.is_main_process():
        path = Path(output_dir(cfg)) / "eval_results.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=2, default=float))
        logger.info("evaluation results written to %s", path)
    return results


def test_time_augmentations(cfg: Any) -> list[T.Augmentation]:
    """The resizing the config applies to test images."""
    if is_lazy(cfg):
        return list(instantiate(cfg.dataloader.test.mapper.augmentations))
    return [T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST)]


def predict(model: nn.Module, image: np.ndarray, augmentations: Sequence[T.Augmentation]) -> Instances:
    """Run a detector on one image.

    Args:
        model: a Detectron2 detector in eval mode.
        image: [H, W, 3] uint8 in ``model.input_format`` (RGB or BGR).
        augmentations: test-time resizing (``test_time_augmentations``).
    Returns:
        ``Instances`` in the original image's coordinates, on the CPU.
    """
    h, w = image.shape[:2]
    aug_input = T.AugInput(image)
    T.AugmentationList(list(augmentations))(aug_input)
    tensor = torch.as_tensor(np.ascontiguousarray(aug_input.image.transpose(2, 0, 1)).astype("float32"))
    with torch.no_grad():
        return model([{"image": tensor, "height": h, "width": w}])[0]["instances"].to("cpu")


def draw(image_rgb: np.ndarray, instances: Instances, metadata: Any, out: str | os.PathLike) -> Path:
    """Boxes, masks, classes and scores drawn with Detectron2's ``Visualizer``, saved as an image."""
    vis = Visualizer(image_rgb, metadata, instance_mode=ColorMode.IMAGE)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    vis.draw_instance_predictions(instances).save(str(out))
    return out


def infer_main(opts: RunOptions, image: str, out: str, threshold: float = 0.5,
               dataset: str | None = None) -> Instances:
    """``detect infer``: detect on one image and draw the result to ``out``."""
    check_image(image)  # missing, not an image, too many pixels: named before any work
    check_output_file(out, "--out")
    for name, json_file, image_root in opts.register:
        register_coco_dataset(name, json_file, image_root)
    cfg = load_config(opts.config, opts.overrides)
    check_config(cfg, splits=())
    model = load_trained_model(cfg, opts.weights, opts.trust_pickle)
    fmt = getattr(model, "input_format", "RGB")
    try:
        pixels = detection_utils.read_image(image, format=fmt)
    except (OSError, SyntaxError, ValueError) as exc:  # pixel data cut after a valid header
        raise DatasetError(f"{image}: not a readable image ({exc})") from None
    instances = predict(model, pixels, test_time_augmentations(cfg))
    instances = instances[instances.scores >= threshold]
    names = [dataset] if dataset else dataset_names(cfg, "test")
    metadata = MetadataCatalog.get(names[0]) if names else MetadataCatalog.get("__unused")
    rgb = pixels[:, :, ::-1] if fmt == "BGR" else pixels
    draw(rgb, instances, metadata, out)
    return instances
