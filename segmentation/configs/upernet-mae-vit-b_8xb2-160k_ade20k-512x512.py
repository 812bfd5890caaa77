# MAE ViT-B/16, UperNet, ADE20K 512x512, 160k iterations (MAE paper: 48.1 mIoU; MMSeg: 48.13).
# The checkpoint: the official MAE pretrain file (mae_pretrain_vit_base.pth) or any encoder
# written by `mae-transfer pretrain`.
_base_ = [
    '_base_/models/upernet_mae_vit.py', '_base_/datasets/ade20k.py',
    '_base_/default_runtime.py', '_base_/schedules/schedule_160k.py'
]
model = dict(pretrained='checkpoints/mae_pretrain_vit_base.pth')
