default_scope = 'mmseg'
# registers MAEViT, ViTLayerDecayOptimizerConstructor, the checked datasets, PerClassIoUMetric
# and SafeCheckpointHook
custom_imports = dict(imports=['segmentation'], allow_failed_imports=False)
env_cfg = dict(
    cudnn_benchmark=True,
    mp_cfg=dict(mp_start_method='fork', opencv_num_threads=0),
    dist_cfg=dict(backend='nccl'),
)
vis_backends = [dict(type='LocalVisBackend'), dict(type='TensorboardVisBackend')]
# no fixed name: each run (experiment) gets its own visualizer and TensorBoard writer
visualizer = dict(type='SegLocalVisualizer', vis_backends=vis_backends)
log_processor = dict(by_epoch=False)
log_level = 'INFO'
load_from = None
resume = False
# MMEngine checkpoints that load (and resume) under torch's weights_only default, see
# segmentation/safe_loading.py
custom_hooks = [dict(type='SafeCheckpointHook')]
