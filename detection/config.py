"""Config plumbing: our yacs keys, the shipped config files, loading either kind with overrides.

The recipes are LazyConfig files in ``detection/configs/`` (``mask_rcnn_vitdet_b_100ep.py`` ...);
``detection/configs/yacs/`` shows the registered backbone in a plain yacs / ``DefaultTrainer``
pipeline. ``add_vit_config`` adds the keys ``build_mae_vit_backbone`` reads to a yacs ``CfgNode``.
"""
from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Callable, Sequence

from detectron2.config import CfgNode, LazyConfig, get_cfg
from omegaconf import DictConfig, ListConfig
from mae_backbone.keys import did_you_mean, init_params

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


class ConfigError(ValueError):
    """A config that cannot be used as given (unknown key, malformed override, mismatch)."""


# the keys of ``train`` that ``detection.engine`` and Detectron2's ``default_setup`` read; any other
# key there would be silently ignored, so it is an error (``check_lazy_config``)
TRAIN_KEYS = {
    "output_dir": None, "init_checkpoint": None, "max_iter": None, "eval_period": None, "log_period": None,
    "device": None, "seed": None, "cudnn_benchmark": None, "float32_precision": None, "init_checkpoint_skip": None,
    "amp": {"enabled"}, "checkpointer": {"period", "max_to_keep", "file_prefix"}, "ddp": None,
}


def call_params(target: Any) -> set[str] | None:
    """Argument names a LazyCall target accepts (None: any, it takes ``**kwargs`` we cannot follow).

    ``mae_backbone.create_vit(name, **overrides)`` passes its overrides to ``VisionTransformer``.
    """
    if isinstance(target, str):
        from detectron2.utils.registry import locate

        try:
            target = locate(target)
        except Exception:
            return None
    from mae_backbone import VisionTransformer, create_vit

    if target is create_vit:
        params = init_params(VisionTransformer)
        return None if params is None else params | {"name"}
    if inspect.isclass(target) and issubclass(target, tuple) and hasattr(target, "_fields"):
        return set(target._fields)  # a namedtuple (Detectron2 0.6's ShapeSpec): its fields are its arguments
    if inspect.isclass(target):
        return init_params(target)
    try:
        params = inspect.signature(target).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def _target_name(target: Any) -> str:
    return target if isinstance(target, str) else f"{getattr(target, '__module__', '?')}.{getattr(target, '__qualname__', target)}"


def check_lazy_config(cfg: Any, source: str = "config") -> None:
    """Unknown keys in a LazyConfig are errors that name the key and suggest the closest valid one.

    - in every ``LazyCall`` node (``_target_``): each key must be an argument of the target
      (``model.backbone.net.dpeth`` -> did you mean 'depth'?);
    - in ``train``: each key must be one the training loop reads (``TRAIN_KEYS``).

    Raises:
        ConfigError: naming ``source``, the dotted key and the suggestion.
    """
    def visit(node: Any, path: str) -> None:
        if isinstance(node, DictConfig):
            target = node.get("_target_") if "_target_" in node else None
            if target is not None:
                known = call_params(target)
                if known is not None:
                    for key in node.keys():
                        if key != "_target_" and key not in known:
                            raise ConfigError(f"{source}: unknown key {f'{path}.{key}'!r}: {_target_name(target)} has no "
                                              f"argument {key!r}{did_you_mean(key, known)}")
            for key in node.keys():
                visit(node._get_node(key), f"{path}.{key}" if path else str(key))
        elif isinstance(node, ListConfig):
            for i in range(len(node)):
                visit(node._get_node(i), f"{path}[{i}]")

    visit(cfg, "")
    train = cfg.get("train") if isinstance(cfg, DictConfig) else None
    if isinstance(train, DictConfig):
        for key in train.keys():
            if key not in TRAIN_KEYS:
                raise ConfigError(f"{source}: unknown key 'train.{key}' (the training loop would ignore it)"
                                  f"{did_you_mean(key, list(TRAIN_KEYS))}")
            sub = TRAIN_KEYS[key]
            if sub is not None and isinstance(train[key], DictConfig):
                for k in train[key].keys():
                    if k not in sub:
                        raise ConfigError(f"{source}: unknown key 'train.{key}.{k}'{did_you_mean(k, list(sub))}")


def add_vit_config(cfg: CfgNode) -> CfgNode:
    """Add ``MODEL.VIT.*`` (and ``SOLVER.OPTIMIZER``) to a Detectron2 yacs config, in place.

    Then ``MODEL.BACKBONE.NAME: "build_mae_vit_backbone"`` in a user's own yaml builds our backbone.

    - ``MODEL.VIT.NAME``: a ``mae_backbone`` architecture (``vit_base_patch16`` ...).
    - ``IMG_SIZE``: the detection resolution (1024); it sizes the global blocks' rel-pos tables.
    - ``PRETRAIN_IMG_SIZE``: the grid the absolute position table keeps (224: 14x14 + class slot,
      ViTDet's ``pretrain_img_size``), interpolated to the input's grid on every forward; 0 keeps
      it at ``IMG_SIZE`` instead (resampled once, on load).
    - ``PATCH_SIZE``, ``DEPTH``: 0 keeps the architecture's (ViT-H runs at patch 16, as in ViTDet).
    - ``WINDOW_SIZE`` (0 = global everywhere), ``GLOBAL_BLOCKS``, ``REL_POS``, ``DROP_PATH_RATE``,
      ``GRAD_CHECKPOINTING``: the ViT's dense options.
    - ``PRETRAINED``: a ViT checkpoint in any format ``mae_backbone`` reads ("" for none).
    - ``PYRAMID``: ``"simple"`` (ViTDet) or ``"fpn"`` (MAE paper; ``MODEL.FPN.*`` configures the FPN).
    - ``OUT_BLOCKS``: the FPN variant's blocks ([] = four evenly spaced).
    - ``NORM``: the pyramid's norm (``"LN"``, any Detectron2 norm, ``""``).
    - ``SQUARE_PAD``: pad inputs to this square side (0 = off).
    - ``LAYER_DECAY``, ``NO_WEIGHT_DECAY`` (parameter names without weight decay: ViTDet's
      ``["pos_embed"]``; ``SOLVER.WEIGHT_DECAY_NORM`` is Detectron2's own key for norm layers) and
      ``SOLVER.OPTIMIZER`` (``"ADAMW"`` or ``"SGD"``): read by
      ``detection.engine.build_vit_optimizer`` (``ViTTrainer.build_optimizer``); Detectron2's own
      ``DefaultTrainer`` builds SGD and does not read them.
    """
    cfg.MODEL.VIT = CfgNode()
    v = cfg.MODEL.VIT
    v.NAME = "vit_base_patch16"
    v.IMG_SIZE = 1024
    v.PRETRAIN_IMG_SIZE = 224
    v.PATCH_SIZE = 0
    v.DEPTH = 0
    v.WINDOW_SIZE = 14
    v.GLOBAL_BLOCKS = [2, 5, 8, 11]
    v.REL_POS = True
    v.DROP_PATH_RATE = 0.1
    v.GRAD_CHECKPOINTING = False
    v.PRETRAINED = ""
    v.PYRAMID = "simple"
    v.OUT_BLOCKS = []
    v.NORM = "LN"
    v.SQUARE_PAD = 1024
    v.LAYER_DECAY = 0.7
    v.NO_WEIGHT_DECAY = ["pos_embed"]
    if "OPTIMIZER" not in cfg.SOLVER:
        cfg.SOLVER.OPTIMIZER = "ADAMW"
    return cfg


# shipped configs that were renamed: old name -> (new name, why)
RENAMED = {
    "mask_rcnn_vitdet_h_100ep": ("mask_rcnn_vitdet_h_75ep", "ViTDet's ViT-H recipe is 75 epochs"),
    "cascade_mask_rcnn_vitdet_h_100ep": ("cascade_mask_rcnn_vitdet_h_75ep", "ViTDet's ViT-H recipe is 75 epochs"),
}


def get_config_file(name: str | Path) -> Path:
    """A config path: an existing file as given, else one shipped in ``detection/configs``.

    ``get_config_file("mask_rcnn_vitdet_b_100ep")`` -> ``.../detection/configs/mask_rcnn_vitdet_b_100ep.py``.
    A shipped config's former name is an error naming the new one (``RENAMED``).
    """
    path = Path(name)
    if path.is_file():
        return path
    for candidate in (CONFIG_DIR / path, CONFIG_DIR / f"{path}.py", CONFIG_DIR / "yacs" / path,
                      CONFIG_DIR / "yacs" / f"{path}.yaml"):
        if candidate.is_file():
            return candidate
    stem = path.name[:-3] if path.name.endswith(".py") else path.name
    if stem in RENAMED and len(path.parts) == 1:
        new, why = RENAMED[stem]
        raise FileNotFoundError(f"{name}: no such config; it was renamed: did you mean {new!r}? ({why})")
    shipped = list_configs()
    raise FileNotFoundError(f"{name}: no such config file, nor a shipped one{did_you_mean(str(name), shipped)} "
                            f"(shipped: {', '.join(shipped)})")


def list_configs() -> list[str]:
    """The shipped config names (LazyConfig files, then yacs files)."""
    lazy = sorted(p.stem for p in CONFIG_DIR.glob("*.py"))
    yacs = sorted(p.name for p in (CONFIG_DIR / "yacs").glob("*.yaml"))
    return lazy + yacs


def is_lazy(cfg: Any) -> bool:
    """Whether a loaded config is a LazyConfig (omegaconf) rather than a yacs ``CfgNode``."""
    return not isinstance(cfg, CfgNode)


def is_lazy_yaml(path: str | Path) -> bool:
    """Whether a ``.yaml`` file is a saved LazyConfig (top-level ``model:`` / ``train:`` / ``dataloader:``,
    as ``LazyConfig.save`` and Detectron2's ``default_setup`` write) rather than yacs (``MODEL:`` ...)."""
    path = Path(path)
    return path.suffix in (".yaml", ".yml") and path.is_file() and any(
        line.startswith(("model:", "train:", "dataloader:")) for line in path.read_text().splitlines())


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> Any:
    """Load a LazyConfig (``.py``, or the ``.yaml`` ``LazyConfig.save`` writes) or a yacs ``.yaml``
    and apply ``key=value`` overrides.

    LazyConfig keys are dotted paths (``train.max_iter=100``, ``model.backbone.pretrained=x.pth``);
    yacs keys are upper case (``SOLVER.MAX_ITER=100``). A key the config lacks is an error.
    """
    path = get_config_file(path)
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ConfigError(f"overrides must be key=value, got {', '.join(bad)}")
    if path.suffix == ".py" or is_lazy_yaml(path):
        cfg = LazyConfig.load(str(path))
        check_lazy_config(cfg, str(path))
        for item in overrides:  # LazyConfig.apply_overrides creates unknown keys; refuse typos instead
            key = item.split("=", 1)[0].lstrip("+")
            parent, _, leaf = key.rpartition(".")
            node = _select(cfg, parent) if parent else cfg
            if node is None or not hasattr(node, "keys"):
                raise ConfigError(f"{path.name}: no config key {key!r} to override ({parent or key!r} is not a "
                                  "group of keys)")
            # a call's arguments may be added (model.backbone.net.depth=2); other dicts are closed
            if leaf not in node and "_target_" not in node:
                raise ConfigError(f"{path.name}: no config key {key!r} to override"
                                  f"{did_you_mean(leaf, [str(k) for k in node.keys()])}")
        before = {item.split("=", 1)[0].lstrip("+"): _select(cfg, item.split("=", 1)[0].lstrip("+"))
                  for item in overrides}
        cfg = LazyConfig.apply_overrides(cfg, list(overrides))
        check_lazy_config(cfg, f"{path.name} with overrides")
        _check_override_types(cfg, before, path.name)
        check_lazy_values(cfg, f"{path.name} with overrides" if overrides else str(path))
        return cfg
    if path.suffix in (".yaml", ".yml"):
        cfg = add_vit_config(get_cfg())
        pairs: list[str] = []
        for item in overrides:
            key, value = item.split("=", 1)
            pairs += [key, value]
        for what, merge, arg in (("", cfg.merge_from_file, str(path)), (" (override)", cfg.merge_from_list, pairs)):
            try:
                merge(arg)
            except (KeyError, AssertionError) as exc:  # yacs: "Non-existent (config) key: SOLVER.MAX_ITERS"
                raise ConfigError(f"{path}{what}: {_yacs_hint(cfg, exc)}") from None
            except ValueError as exc:  # yacs: "Type mismatch (<class 'int'> vs. <class 'str'>) ... key: SOLVER.MAX_ITER"
                raise ConfigError(f"{path}{what}: {exc}") from None
        check_yacs_values(cfg, str(path))
        return cfg
    raise ConfigError(f"{path}: a config must be a LazyConfig .py or a yacs .yaml file")


# value types of the keys the training loop, the data loaders and the optimizer read, checked after the
# overrides so that ``train.max_iter=abc`` or ``dataloader.train.total_batch_size=0`` is a ConfigError
# naming the key before any work starts (not a TypeError deep in a scheduler): key -> (types, minimum)
_INT, _NUMBER, _BOOL = (int,), (int, float), (bool,)
LAZY_VALUE_TYPES: dict[str, tuple[tuple[type, ...], float | None]] = {
    "train.max_iter": (_INT, 1), "train.eval_period": (_INT, 0), "train.log_period": (_INT, 1),
    "train.checkpointer.period": (_INT, 1), "train.checkpointer.max_to_keep": (_INT, 1), "train.seed": (_INT, None),
    "train.amp.enabled": (_BOOL, None), "train.cudnn_benchmark": (_BOOL, None),
    "dataloader.train.total_batch_size": (_INT, 1), "dataloader.train.num_workers": (_INT, 0),
    "dataloader.test.num_workers": (_INT, 0), "dataloader.test.batch_size": (_INT, 1),
    "optimizer.lr": (_NUMBER, 0), "optimizer.weight_decay": (_NUMBER, 0), "optimizer.momentum": (_NUMBER, 0),
    "optimizer.params.layer_decay": (_NUMBER, 0), "optimizer.params.weight_decay_norm": (_NUMBER, 0),
    "lr_multiplier.warmup_iters": (_NUMBER, 0),  # ViTDet's ViT-H recipe scales it to a fraction
}
NONE_ALLOWED = {"train.checkpointer.max_to_keep",  # fvcore: keep every checkpoint
                "optimizer.params.weight_decay_norm"}  # get_vit_param_groups: norms decay like weights
YACS_VALUE_TYPES: dict[str, tuple[tuple[type, ...], float | None]] = {
    "SOLVER.MAX_ITER": (_INT, 1), "SOLVER.IMS_PER_BATCH": (_INT, 1), "SOLVER.CHECKPOINT_PERIOD": (_INT, 1),
    "TEST.EVAL_PERIOD": (_INT, 0), "DATALOADER.NUM_WORKERS": (_INT, 0), "SOLVER.BASE_LR": (_NUMBER, 0),
}


def _type_words(types: tuple[type, ...]) -> str:
    return {_INT: "an integer", _NUMBER: "a number", _BOOL: "True or False"}.get(types, " or ".join(t.__name__ for t in types))


def _check_value(key: str, value: Any, types: tuple[type, ...], minimum: float | None, source: str) -> None:
    if value is None and key in NONE_ALLOWED:
        return
    is_bool = isinstance(value, bool)
    if (is_bool and bool not in types) or not isinstance(value, types):
        raise ConfigError(f"{source}: {key} must be {_type_words(types)}, not {value!r}")
    if minimum is not None and not is_bool and value < minimum:
        raise ConfigError(f"{source}: {key} must be at least {minimum:g}, not {value!r}")


def check_lazy_values(cfg: Any, source: str = "config") -> None:
    """The value types (and least values) of the keys in ``LAZY_VALUE_TYPES`` that the config has.

    Raises:
        ConfigError: naming ``source``, the key, the expected type and the value.
    """
    from omegaconf import OmegaConf

    for key, (types, minimum) in LAZY_VALUE_TYPES.items():
        parent, _, leaf = key.rpartition(".")
        node = _select(cfg, parent)
        if not isinstance(node, DictConfig) or leaf not in node:
            continue
        try:
            value = OmegaConf.select(cfg, key)
        except Exception as exc:  # an interpolation that does not resolve (${..lr} to a missing key)
            raise ConfigError(f"{source}: {key} cannot be resolved: {exc}".splitlines()[0]) from None
        _check_value(key, value, types, minimum, source)


def check_yacs_values(cfg: CfgNode, source: str = "config") -> None:
    """``YACS_VALUE_TYPES`` for a yacs config (yacs itself checks an override's type against the
    default's, but not least values such as a batch of 0)."""
    for key, (types, minimum) in YACS_VALUE_TYPES.items():
        node: Any = cfg
        for part in key.split("."):
            node = node.get(part) if isinstance(node, CfgNode) else None
        if node is not None:
            _check_value(key, node, types, minimum, source)


def _check_override_types(cfg: Any, before: dict[str, Any], source: str) -> None:
    """An override of a number or a flag by a value of another kind (``model.backbone.net.depth=abc``)
    is an error naming the key: LazyConfig keeps what ``literal_eval`` cannot read as a string."""
    for key, old in before.items():
        if not isinstance(old, (bool, int, float)) or old is None:
            continue
        new = _select(cfg, key)
        if isinstance(old, bool) != isinstance(new, bool) or not isinstance(new, (int, float)):
            want = _BOOL if isinstance(old, bool) else _NUMBER if isinstance(old, float) else _INT
            raise ConfigError(f"{source}: override {key}={new!r}: {key} must be {_type_words(want)} "
                              f"(it is {old!r} in the config)")


def _yacs_hint(cfg: CfgNode, exc: Exception) -> str:
    msg = str(exc.args[0]) if exc.args else str(exc)
    if not msg.startswith("Non-existent"):
        return msg
    key = msg.rsplit(":", 1)[-1].strip()
    parent, _, leaf = key.rpartition(".")
    node = cfg
    for part in parent.split(".") if parent else []:
        node = node.get(part) if isinstance(node, CfgNode) else None
    known = [str(k) for k in node.keys()] if isinstance(node, CfgNode) else []
    return f"unknown config key {key!r}{did_you_mean(leaf, known)}" if known else msg


def _select(cfg: Any, key: str) -> Any:
    from omegaconf import OmegaConf

    try:
        return OmegaConf.select(cfg, key, default=None)
    except Exception:  # an interpolation that does not resolve: left to the checks that name it
        return None
