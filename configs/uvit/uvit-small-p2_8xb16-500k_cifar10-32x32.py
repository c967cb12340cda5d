# U-ViT-S/2 on CIFAR-10, unconditional, continuous VP-SDE (official FID 3.11 with 1000-step Euler-Maruyama).
_base_ = ['../_base_/uvit_runtime.py']
model = dict(
    type='UViTDiffusion',
    network=dict(type='UViT', arch='small', img_size=32, patch_size=2, in_channels=3, num_classes=0),
    schedule='continuous',
    sampler=dict(steps=50, order=3))
train_pipeline = [dict(type='RandomFlip', prob=0.5, direction='horizontal'), dict(type='PackInputs')]
train_dataloader = dict(
    batch_size=16,  # x 8 GPUs = 128
    num_workers=4,
    sampler=dict(type='InfiniteSampler', shuffle=True),
    dataset=dict(type='CIFAR10', data_root='data/cifar10', split='train', pipeline=train_pipeline))
optim_wrapper = dict(optimizer=dict(betas=(0.99, 0.999)))
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-3, by_epoch=False, begin=0, end=2500),
    dict(type='ConstantLR', factor=1.0, by_epoch=False, begin=2500),
]
train_cfg = dict(max_iters=500000)
