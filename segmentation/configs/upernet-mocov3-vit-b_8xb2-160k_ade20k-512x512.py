# MoCo v3 ViT-B/16 (the official 300-epoch vit-b-300ep.pth.tar), same model and recipe as the MAE config
# (MAE paper baseline: 47.3 mIoU). Only the checkpoint differs.
_base_ = './upernet-mae-vit-b_8xb2-160k_ade20k-512x512.py'
model = dict(pretrained='checkpoints/mocov3_vit-b-300ep.pth.tar')
