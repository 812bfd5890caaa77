# UperNet + FCN auxiliary head on our MAEViT (ViT-B/16) with MMSeg's Feature2Pyramid neck, as
# MMSeg 1.2.2's mae-base_upernet_8xb2-amp-160k_ade20k-512x512.py (48.13 mIoU) builds its `MAE`
# backbone: BEiT's relative position bias table per block (zero-initialized: "relative position
# bias turned on during transfer and initialised to zero", MAE paper A.4) and layer scale
# gamma_1/gamma_2 = init_values 1.0; drop path 0.1; outputs after blocks 4, 6, 8, 12 without a
# final norm; LayerNorm eps 1e-6.
# Backbone checkpoint keys: backbone.vit.* (our ViT layout); `model.pretrained` takes any
# checkpoint mae_backbone reads (ours, timm, official MAE, DeiT, MoCo v3, HF, Detectron2, MMSeg
# VisionTransformer / MAE); the position embedding is resampled to the 32x32 grid when loading.
norm_cfg = dict(type='SyncBN', requires_grad=True)  # plain BN when not distributed (MMEngine reverts it)
data_preprocessor = dict(
    type='SegDataPreProcessor',
    mean=[123.675, 116.28, 103.53],  # ImageNet RGB statistics, as in MAE pretraining
    std=[58.395, 57.12, 57.375],
    bgr_to_rgb=True,
    pad_val=0,
    seg_pad_val=255,
    size=(512, 512))
model = dict(
    type='EncoderDecoder',
    data_preprocessor=data_preprocessor,
    pretrained=None,
    backbone=dict(
        type='MAEViT',
        arch='base',
        img_size=512,
        out_indices=[3, 5, 7, 11],
        drop_path_rate=0.1,
        use_rel_pos='beit',
        init_values=1.0,
        window_size=0,
        frozen_stages=-1,
        with_cp=False,
        norm_out=False),
    neck=dict(type='Feature2Pyramid', embed_dim=768, rescales=[4, 2, 1, 0.5], norm_cfg=norm_cfg),
    decode_head=dict(
        type='UPerHead',
        in_channels=[768, 768, 768, 768],
        in_index=[0, 1, 2, 3],
        pool_scales=(1, 2, 3, 6),
        channels=768,
        dropout_ratio=0.1,
        num_classes=150,
        norm_cfg=norm_cfg,
        align_corners=False,
        loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0)),
    auxiliary_head=dict(
        type='FCNHead',
        in_channels=768,
        in_index=2,
        channels=256,
        num_convs=1,
        concat_input=False,
        dropout_ratio=0.1,
        num_classes=150,
        norm_cfg=norm_cfg,
        align_corners=False,
        loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=0.4)),
    train_cfg=dict(),
    test_cfg=dict(mode='slide', crop_size=(512, 512), stride=(341, 341)))
