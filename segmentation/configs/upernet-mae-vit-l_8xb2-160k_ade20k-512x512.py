# MAE ViT-L/16, UperNet, ADE20K 512x512, 160k iterations (MAE paper Table 5: 53.6 mIoU).
# The MAE paper gives no ViT-L segmentation hyper-parameters (A.4: the lr is searched per entry)
# and MMSeg ships no MAE ViT-L config; the B recipe's layer decay 0.65 over 24 blocks would leave
# the patch embedding 0.65**25 = 2e-5 of the base lr. The optimizer is therefore the published
# ViT-L UperNet ADE20K recipe of BEiT, whose segmentation code MAE followed (A.4): layer decay
# 0.95 over 24 layers, lr 2e-5, drop path 0.2, outputs after blocks 8, 12, 16, 24. Sources:
# BEiT's upernet_beit_large_24_512_slide_160k_ade20k.py (github.com/microsoft/unilm,
# beit/semantic_segmentation/configs/beit/upernet; 512 crop, 160k iterations, 1500 warmup,
# 8 GPUs x 2 images, as here) and MMSeg 1.2.2's beit-large_upernet_8xb1-amp-160k_ade20k-640x640.py
# (paramwise_cfg=dict(num_layers=24, layer_decay_rate=0.95), AdamW lr 2e-5).
_base_ = './upernet-mae-vit-b_8xb2-160k_ade20k-512x512.py'
model = dict(
    pretrained='checkpoints/mae_pretrain_vit_large.pth',
    backbone=dict(arch='large', out_indices=[7, 11, 15, 23], drop_path_rate=0.2),
    neck=dict(embed_dim=1024),
    decode_head=dict(in_channels=[1024, 1024, 1024, 1024], channels=1024),
    auxiliary_head=dict(in_channels=1024))
optim_wrapper = dict(optimizer=dict(lr=2e-5), paramwise_cfg=dict(layer_decay=0.95))
