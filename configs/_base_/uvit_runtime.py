# U-ViT training runtime (official recipes): AdamW on every parameter, lr warm-up then constant, EMA 0.9999 every
# step, iteration-based, no validation loop (sample with tools/sample.py, score with tools/analysis/fid.py).
# Add --amp to tools/train.py for the official fp16 training.
_base_ = ['mmpretrain::_base_/default_runtime.py']
custom_imports = dict(imports=['sparsevit_mm'], allow_failed_imports=False)

optim_wrapper = dict(type='OptimWrapper', optimizer=dict(type='AdamW', lr=2e-4, weight_decay=0.03, betas=(0.99, 0.99)))
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-3, by_epoch=False, begin=0, end=5000),
    dict(type='ConstantLR', factor=1.0, by_epoch=False, begin=5000),
]
train_cfg = dict(type='IterBasedTrainLoop', max_iters=300000)
val_cfg = None
val_dataloader = None
val_evaluator = None
test_cfg = None
test_dataloader = None
test_evaluator = None
custom_hooks = [
    dict(type='EMAHook', momentum=1e-4, update_buffers=False, priority='ABOVE_NORMAL'),
    dict(type='RandomStateHook'),  # RNG states in checkpoints: resuming is bit-identical
    dict(type='CheckpointLayoutHook'),  # load_from / resume: any supported layout, misfits refused
]
default_hooks = dict(logger=dict(interval=100),
                     checkpoint=dict(type='CheckpointHook', interval=50000, by_epoch=False, max_keep_ckpts=3))
log_processor = dict(by_epoch=False)
randomness = dict(seed=1234)
