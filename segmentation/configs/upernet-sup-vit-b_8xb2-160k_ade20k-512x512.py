# Supervised ImageNet-1k ViT-B/16 (DeiT-B), same model and recipe as the MAE config
# (MAE paper baseline: 47.4 mIoU). Only the checkpoint differs.
_base_ = './upernet-mae-vit-b_8xb2-160k_ade20k-512x512.py'
model = dict(pretrained='checkpoints/deit_base_patch16_224-b5f2ef4d.pth')
