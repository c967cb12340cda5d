# DynamicSwin / DynamicCNN (ConvNeXt) recipe on ImageNet-1k (official T-PAMI code): 120 epochs, global batch
# 8 GPUs x 128 x 4 accumulated steps = 4096, AdamW lr 4e-3 with 20 warm-up epochs and a cosine decay to 1e-6,
# the pretrained backbone at 0.2x lr and frozen for the first 5 epochs, EMA, Mixup / CutMix, label smoothing.
# Objective: cls + 10 x keep-ratio + 0.5 x KL(teacher logits) + 0.5 x MSE(final feature map, every position).
_base_ = [
    'mmpretrain::_base_/datasets/imagenet_bs64_swin_224.py',
    'mmpretrain::_base_/schedules/imagenet_bs1024_adamw_swin.py',
    'mmpretrain::_base_/default_runtime.py',
]
custom_imports = dict(imports=['sparsevit_mm'], allow_failed_imports=False)

model = dict(
    type='DynamicViTClassifier',
    head=dict(
        type='LinearClsHead',
        num_classes=1000,
        loss=dict(type='LabelSmoothLoss', label_smooth_val=0.1, mode='original')),
    keep_ratio_weight=10.0,
    distill_logits_weight=0.5,
    distill_tokens_weight=0.5,
    token_distill='mse',
    train_cfg=dict(augments=[dict(type='Mixup', alpha=0.8), dict(type='CutMix', alpha=1.0)]),
)

train_dataloader = dict(batch_size=128)
optim_wrapper = dict(
    optimizer=dict(lr=4e-3, weight_decay=0.05),
    accumulative_counts=4,
    paramwise_cfg=dict(
        norm_decay_mult=0.0,
        bias_decay_mult=0.0,
        custom_keys={
            'backbone.score_predictors': dict(lr_mult=1.0),
            '.fast_path': dict(lr_mult=1.0),
            'backbone': dict(lr_mult=0.2),
        }),
)
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-3, by_epoch=True, end=20, convert_to_iter_based=True),
    dict(type='CosineAnnealingLR', eta_min=1e-6, by_epoch=True, begin=20, end=120, convert_to_iter_based=True),
]
train_cfg = dict(by_epoch=True, max_epochs=120, val_interval=1)
custom_hooks = [
    dict(type='FreezeBackboneHook', epochs=5),
    dict(type='EMAHook', momentum=1e-4, priority='ABOVE_NORMAL'),
    dict(type='RandomStateHook'),  # RNG states in checkpoints: resuming is bit-identical
    dict(type='CheckpointLayoutHook'),  # load_from / resume: any supported layout, misfits refused
]
auto_scale_lr = dict(base_batch_size=4096)
