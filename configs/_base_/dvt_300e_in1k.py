# DVT recipe (official main.py): 300 epochs + 10 cool-down epochs at the minimum lr, 20 warm-up epochs, AdamW,
# cosine decay to 1e-5, Mixup 0.8 / CutMix 1.0, label smoothing 0.1, RandAugment and random erasing (mmpretrain's
# Swin / DeiT ImageNet pipeline), drop path 0.1, EMA 0.99996. The loss is the unweighted sum of the three exits'
# losses (logged as loss_exit1/2/3). Evaluation reports accuracy plus where samples left and the expected GFLOPs.
_base_ = [
    'mmpretrain::_base_/datasets/imagenet_bs64_swin_224.py',
    'mmpretrain::_base_/schedules/imagenet_bs1024_adamw_swin.py',
    'mmpretrain::_base_/default_runtime.py',
]
custom_imports = dict(imports=['sparsevit_mm'], allow_failed_imports=False)

model = dict(
    type='DVT',
    num_classes=1000,
    drop_path_rate=0.1,
    loss=dict(type='LabelSmoothLoss', label_smooth_val=0.1, mode='original'),
    train_cfg=dict(augments=[dict(type='Mixup', alpha=0.8), dict(type='CutMix', alpha=1.0)]),
    # thresholds=[t1, t2, t3] or budget=<GFLOPs> (with a fitted checkpoint) select the exits at test time
)
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-3, by_epoch=True, end=20, convert_to_iter_based=True),
    dict(type='CosineAnnealingLR', eta_min=1e-5, by_epoch=True, begin=20, end=300, convert_to_iter_based=True),
    dict(type='ConstantLR', factor=1.0, by_epoch=True, begin=300, end=310),
]
train_cfg = dict(by_epoch=True, max_epochs=310, val_interval=10)
custom_hooks = [
    dict(type='EMAHook', momentum=4e-5, priority='ABOVE_NORMAL'),
    dict(type='RandomStateHook'),  # RNG states in checkpoints: resuming is bit-identical
    dict(type='CheckpointLayoutHook'),  # load_from / resume: any supported layout, misfits refused
]
val_evaluator = [dict(type='Accuracy', topk=(1, 5)), dict(type='EarlyExitMetric')]
test_evaluator = val_evaluator
