"""ViTDet's 100-epoch COCO schedule: 184375 iterations x 64 images (118k images x 100),
250 warmup iterations, lr x0.1 at epochs 88.9 and 96.3; mixed precision; checkpoints and COCO
evaluation every 5000 iterations."""
from detectron2.config import LazyCall as L

from detection.optim import step_lr_multiplier

train = dict(
    output_dir="./output",
    init_checkpoint="",  # a full detector checkpoint; ViT encoder weights go in model.backbone.pretrained
    init_checkpoint_skip=[],  # keys of init_checkpoint left at init (e.g. "roi_heads.box_predictor.*"); else strict
    max_iter=184375,
    amp=dict(enabled=True),
    ddp=dict(broadcast_buffers=False, find_unused_parameters=False, fp16_compression=True),
    checkpointer=dict(period=5000, max_to_keep=100),
    eval_period=5000,
    log_period=20,
    device="cuda",
    seed=-1,  # >= 0 for reproducible runs
)

# the milestones follow train.max_iter when it is overridden
lr_multiplier = L(step_lr_multiplier)(max_iter="${train.max_iter}", decay_at=(8 / 9, 26 / 27), warmup_iters=250)
