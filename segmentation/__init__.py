"""segmentation: a thin MMSegmentation adapter over ``mae_backbone``.

Importing this package registers, in MMSeg's registries:

- ``MAEViT`` (``MODELS``): our ViT as a backbone; checkpoint keys ``backbone.vit.*``;
- ``ViTLayerDecayOptimizerConstructor`` (``OPTIM_WRAPPER_CONSTRUCTORS``): layer-wise lr decay
  from the backbone's ``layer_id`` hook;
- ``CheckedADE20KDataset`` / ``ADELayoutDataset`` (``DATASETS``): the ADE20K layout, checked;
- ``PerClassIoUMetric`` (``METRICS``): ``IoUMetric`` that keeps its per-class table;
- ``SafeCheckpointHook`` (MMEngine's ``HOOKS``): checkpoints that resume under ``weights_only``;
- ``CheckedRunner`` (MMEngine's ``RUNNERS``): the Runner whose checkpoint loads are strict
  (``load_segmentor_state``: a tensor that does not fit is an error naming it, not a warning).

A config of your own only needs
``custom_imports = dict(imports=['segmentation'], allow_failed_imports=False)``.
Configs: ``segmentation/configs`` (``CONFIG_DIR``).
"""
from segmentation.backbone import MAEViT
from segmentation.checkpoint import CheckedRunner, load_segmentor_state
from segmentation.datasets import ADELayoutDataset, CheckedADE20KDataset, DatasetError, check_label_maps
from segmentation.engine import CONFIG_DIR, ConfigError, load_config
from segmentation.metrics import PerClassIoUMetric
from segmentation.optim import ViTLayerDecayOptimizerConstructor
from segmentation.safe_loading import SafeCheckpointHook, from_plain, to_plain

__all__ = [
    "CONFIG_DIR",
    "ADELayoutDataset",
    "CheckedRunner",
    "CheckedADE20KDataset",
    "ConfigError",
    "DatasetError",
    "MAEViT",
    "PerClassIoUMetric",
    "SafeCheckpointHook",
    "ViTLayerDecayOptimizerConstructor",
    "check_label_maps",
    "from_plain",
    "load_segmentor_state",
    "load_config",
    "to_plain",
]
