# U-ViT-M/4 on ImageNet 64x64, class-conditional (1000 classes, no guidance), continuous VP-SDE (official FID 5.85).
_base_ = ['../_base_/uvit_runtime.py']
model = dict(
    type='UViTDiffusion',
    network=dict(type='UViT', arch='mid', img_size=64, patch_size=4, in_channels=3, num_classes=1000,
                 use_checkpoint=True),
    schedule='continuous')
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='ResizeEdge', scale=64, edge='short', backend='pillow', interpolation='bicubic'),
    dict(type='CenterCrop', crop_size=64),
    dict(type='RandomFlip', prob=0.5, direction='horizontal'),
    dict(type='PackInputs'),
]
train_dataloader = dict(
    batch_size=128,  # x 8 GPUs = 1024
    num_workers=8,
    sampler=dict(type='InfiniteSampler', shuffle=True),
    dataset=dict(type='ImageNet', data_root='data/imagenet', split='train', pipeline=train_pipeline))
optim_wrapper = dict(optimizer=dict(lr=3e-4))
train_cfg = dict(max_iters=300000)
