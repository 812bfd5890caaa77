"""Config plumbing: our yacs keys, the shipped config files, loading either kind with overrides.

The recipes are LazyConfig files in ``detection/configs/`` (``mask_rcnn_vitdet_b_100ep.py`` ...);
``detection/configs/yacs/`` shows the registered backbone in a plain yacs / ``DefaultTrainer``
pipeline. ``add_vit_config`` adds the keys ``build_mae_vit_backbone`` reads to a yacs ``CfgNode``.
"""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Sequence

from detectron2.config import CfgNode, LazyConfig, get_cfg

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


class ConfigError(ValueError):
    """A config that cannot be used as given (unknown key, malformed override, mismatch)."""


def add_vit_config(cfg: CfgNode) -> CfgNode:
    """Add ``MODEL.VIT.*`` (and ``SOLVER.OPTIMIZER``) to a Detectron2 yacs config, in place.

    Then ``MODEL.BACKBONE.NAME: "build_mae_vit_backbone"`` in a user's own yaml builds our backbone.

    - ``MODEL.VIT.NAME``: a ``mae_backbone`` architecture (``vit_base_patch16`` ...).
    - ``IMG_SIZE``: the detection resolution the pos-embed is resampled to (1024).
    - ``PATCH_SIZE``, ``DEPTH``: 0 keeps the architecture's (ViT-H runs at patch 16, as in ViTDet).
    - ``WINDOW_SIZE`` (0 = global everywhere), ``GLOBAL_BLOCKS``, ``REL_POS``, ``DROP_PATH_RATE``,
      ``GRAD_CHECKPOINTING``: the ViT's dense options.
    - ``PRETRAINED``: a ViT checkpoint in any format ``mae_backbone`` reads ("" for none).
    - ``PYRAMID``: ``"simple"`` (ViTDet) or ``"fpn"`` (MAE paper; ``MODEL.FPN.*`` configures the FPN).
    - ``OUT_BLOCKS``: the FPN variant's blocks ([] = four evenly spaced).
    - ``NORM``: the pyramid's norm (``"LN"``, any Detectron2 norm, ``""``).
    - ``SQUARE_PAD``: pad inputs to this square side (0 = off).
    - ``LAYER_DECAY`` and ``SOLVER.OPTIMIZER`` (``"ADAMW"`` or ``"SGD"``): read by
      ``detection.engine.build_vit_optimizer`` (``ViTTrainer.build_optimizer``); Detectron2's own
      ``DefaultTrainer`` builds SGD and does not read them.
    """
    cfg.MODEL.VIT = CfgNode()
    v = cfg.MODEL.VIT
    v.NAME = "vit_base_patch16"
    v.IMG_SIZE = 1024
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
    if "OPTIMIZER" not in cfg.SOLVER:
        cfg.SOLVER.OPTIMIZER = "ADAMW"
    return cfg


def get_config_file(name: str | Path) -> Path:
    """A config path: an existing file as given, else one shipped in ``detection/configs``.

    ``get_config_file("mask_rcnn_vitdet_b_100ep")`` -> ``.../detection/configs/mask_rcnn_vitdet_b_100ep.py``.
    """
    path = Path(name)
    if path.is_file():
        return path
    for candidate in (CONFIG_DIR / path, CONFIG_DIR / f"{path}.py", CONFIG_DIR / "yacs" / path,
                      CONFIG_DIR / "yacs" / f"{path}.yaml"):
        if candidate.is_file():
            return candidate
    shipped = list_configs()
    close = difflib.get_close_matches(str(name), shipped, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise FileNotFoundError(f"{name}: no such config file, nor a shipped one{hint} (shipped: {', '.join(shipped)})")


def list_configs() -> list[str]:
    """The shipped config names (LazyConfig files, then yacs files)."""
    lazy = sorted(p.stem for p in CONFIG_DIR.glob("*.py"))
    yacs = sorted(p.name for p in (CONFIG_DIR / "yacs").glob("*.yaml"))
    return lazy + yacs


def is_lazy(cfg: Any) -> bool:
    """Whether a loaded config is a LazyConfig (omegaconf) rather than a yacs ``CfgNode``."""
    return not isinstance(cfg, CfgNode)


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> Any:
    """Load a LazyConfig ``.py`` or a yacs ``.yaml`` and apply ``key=value`` overrides.

    LazyConfig keys are dotted paths (``train.max_iter=100``, ``model.backbone.pretrained=x.pth``);
    yacs keys are upper case (``SOLVER.MAX_ITER=100``). A key the config lacks is an error.
    """
    path = get_config_file(path)
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ConfigError(f"overrides must be key=value, got {', '.join(bad)}")
    if path.suffix == ".py":
        cfg = LazyConfig.load(str(path))
        for item in overrides:  # LazyConfig.apply_overrides creates unknown keys; refuse typos instead
            key = item.split("=", 1)[0].lstrip("+")
            parent, _, leaf = key.rpartition(".")
            node = _select(cfg, parent) if parent else cfg
            # a call's arguments may be added (model.backbone.net.depth=2); other dicts are closed
            if node is None or not hasattr(node, "keys") or (leaf not in node and "_target_" not in node):
                raise ConfigError(f"{path.name}: no config key {key!r} to override")
        return LazyConfig.apply_overrides(cfg, list(overrides))
    if path.suffix in (".yaml", ".yml"):
        cfg = add_vit_config(get_cfg())
        cfg.merge_from_file(str(path))
        pairs: list[str] = []
        for item in overrides:
            key, value = item.split("=", 1)
            pairs += [key, value]
        cfg.merge_from_list(pairs)
        return cfg
    raise ConfigError(f"{path}: a config must be a LazyConfig .py or a yacs .yaml file")


def _select(cfg: Any, key: str) -> Any:
    from omegaconf import OmegaConf

    return OmegaConf.select(cfg, key, default=None)
