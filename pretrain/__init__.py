"""pretrain: MAE pretraining = the mae_backbone encoder + a light decoder, masking, loss, data,
the training loop and reconstruction figures (torch + torchvision only); and the controlled
baselines on the same encoder and budget: MoCo v3 (``pretrain.moco``) and a supervised ViT
(``pretrain.supervised``), all three behind ``pretrain_backbone``.

    from pretrain import create_mae, make_config, train
    model = create_mae("mae_vit_base_patch16")              # the paper's 8 x 512 decoder
    loss, pred, mask = model(imgs, mask_ratio=0.75)          # mask: 1 = removed
    train(make_config({"data": "imgs/", "output": "runs/mae"}))
    enc = pretrain_backbone("mocov3", "data/", "runs/moco", epochs=30, batch_size=32)  # encoder file
"""
from pretrain.baselines import pretrain_backbone
from pretrain.config import METHODS, PretrainConfig, make_config
from pretrain.data import AUGMENTATIONS, ImageFiles, build_transform
from pretrain.masking import MASKINGS, block_mask, grid_mask, mask_noise, num_keep
from pretrain.model import MAE_ARCHS, TARGETS, MaskedAutoencoderViT, create_mae, list_mae_models
from pretrain.moco import MoCoV3, contrastive_loss, create_moco, momentum_at
from pretrain.state import CHECKPOINT_NAME, ENCODER_NAME, export_encoder
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
    "block_mask",
    "build_model",
    "build_transform",
    "contrastive_loss",
    "create_mae",
    "create_moco",
    "export_encoder",
    "grid_mask",
    "list_images",
    "list_mae_models",
    "load_mae",
    "make_config",
    "mask_noise",
    "momentum_at",
    "num_keep",
    "pretrain_backbone",
    "reconstruct",
    "render_figure",
    "train",
    "visualize",
]
