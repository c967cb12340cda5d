# DynamicViT recipe (ImageNet-1k, 30 epochs, global batch 8 x 128 = 1024), on mmpretrain's own bases.
# Children set `model.backbone.arch` / `keep_ratio`, the head width and the pretrained file.
_base_ = [
    'mmpretrain::_base_/datasets/imagenet_bs64_swin_224.py',
    'mmpretrain::_base_/schedules/imagenet_bs1024_adamw_swin.py',
    'mmpretrain::_base_/default_runtime.py',
]
custom_imports = dict(imports=['sparsevit_mm'], allow_failed_imports=False)

model = dict(
    type='DynamicViTClassifier',
    backbone=dict(type='DynamicViT', keep_ratio=0.7),
    head=dict(
        type='VisionTransformerClsHead',
        num_classes=1000,
        loss=dict(type='LabelSmoothLoss', label_smooth_val=0.1, mode='original')),
    # Objective: cls + 2.0 * keep-ratio + 0.5 * KL(teacher logits) + 0.5 * token distillation (kept tokens).
    keep_ratio_weight=2.0,
    distill_logits_weight=0.5,
    distill_tokens_weight=0.5,
    token_distill='mse',
    train_cfg=dict(augments=[dict(type='Mixup', alpha=0.8), dict(type='CutMix', alpha=1.0)]),
)

train_dataloader = dict(batch_size=128)
val_dataloader = dict(batch_size=128)
test_dataloader = val_dataloader

# lr 1e-3 for the new modules; the pretrained backbone runs at 0.01x and is frozen for the first 5 epochs;
# cls token and position embedding are never updated.
optim_wrapper = dict(
    optimizer=dict(lr=1e-3, weight_decay=0.05),
    paramwise_cfg=dict(
        norm_decay_mult=0.0,
        bias_decay_mult=0.0,
        custom_keys={
            'backbone.score_predictors': dict(lr_mult=1.0),
            '.cls_token': dict(lr_mult=0.0, decay_mult=0.0),
            '.pos_embed': dict(lr_mult=0.0, decay_mult=0.0),
            'backbone': dict(lr_mult=0.01),
        }),
)
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-3, by_epoch=True, end=5, convert_to_iter_based=True),
    dict(type='CosineAnnealingLR', eta_min=1e-6, by_epoch=True, begin=5, end=30, convert_to_iter_based=True),
]
train_cfg = dict(by_epoch=True, max_epochs=30, val_interval=1)
custom_hooks = [
    dict(type='FreezeBackboneHook', epochs=5),
    dict(type='EMAHook', momentum=1e-4, priority='ABOVE_NORMAL'),
    dict(type='RandomStateHook'),  # RNG states in checkpoints: resuming is bit-identical
    dict(type='CheckpointLayoutHook'),  # load_from / resume: any supported layout, misfits refused
]
auto_scale_lr = dict(base_batch_size=1024)
