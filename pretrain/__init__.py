"""pretrain: MAE pretraining = the mae_backbone encoder + a light decoder, masking, loss, data,
the training step and reconstruction figures (torch + torchvision only; the run itself is the
shared ``training`` runtime's); and the contrastive baseline on the same encoder and budget,
MoCo v3 (``pretrain.moco``).  All three baselines (with the supervised ViT, which is the
classification trainer's) are behind ``mae_transfer.baselines.pretrain_backbone``.

    from pretrain import create_mae, make_config, train
    model = create_mae("mae_vit_base_patch16")              # the paper's 8 x 512 decoder
    loss, pred, mask = model(imgs, mask_ratio=0.75)          # mask: 1 = removed
    train(make_config({"data": "imgs/", "output": "runs/mae"}))
"""
from pretrain.config import METHODS, PretrainConfig, add_arguments, config_from_args, make_config
from pretrain.data import AUGMENTATIONS, ImageFiles, build_transform
from pretrain.masking import MASKINGS, block_mask, grid_mask, mask_noise, num_keep
from pretrain.model import MAE_ARCHS, TARGETS, MaskedAutoencoderViT, create_mae, list_mae_models
from pretrain.moco import MoCoV3, contrastive_loss, create_moco, momentum_at
from pretrain.state import CHECKPOINT_NAME, ENCODER_NAME, export_encoder, load_training_state, save_training_state
from pretrain.train import RunResult, build_model, train
from pretrain.visualize import load_mae, reconstruct, render_figure, visualize
from training import DataError, EpochBatchSampler, NonFiniteModelError, TrainingDiverged, list_images

__all__ = [
    "AUGMENTATIONS",
    "CHECKPOINT_NAME",
    "DataError",
    "ENCODER_NAME",
    "EpochBatchSampler",
    "ImageFiles",
    "MAE_ARCHS",
    "MASKINGS",
    "METHODS",
    "MoCoV3",
    "MaskedAutoencoderViT",
    "NonFiniteModelError",
    "PretrainConfig",
    "RunResult",
    "TARGETS",
    "TrainingDiverged",
    "add_arguments",
    "block_mask",
    "build_model",
    "build_transform",
    "config_from_args",
    "contrastive_loss",
    "create_mae",
    "create_moco",
    "export_encoder",
    "grid_mask",
    "list_images",
    "list_mae_models",
    "load_mae",
    "load_training_state",
    "make_config",
    "mask_noise",
    "momentum_at",
    "num_keep",
    "reconstruct",
    "save_training_state",
    "render_figure",
    "train",
    "visualize",
]
