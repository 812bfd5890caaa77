# MAE ViT-L/16, UperNet, ADE20K 512x512, 160k iterations (MAE paper: 53.6 mIoU).
# Same recipe as ViT-B (layer decay 0.65, lr 1e-4); outputs after blocks 8, 12, 16, 24.
_base_ = './upernet-mae-vit-b_8xb2-160k_ade20k-512x512.py'
model = dict(
    pretrained='checkpoints/mae_pretrain_vit_large.pth',
    backbone=dict(arch='large', out_indices=[7, 11, 15, 23]),
    neck=dict(embed_dim=1024),
    decode_head=dict(in_channels=[1024, 1024, 1024, 1024], channels=1024),
    auxiliary_head=dict(in_channels=1024))
