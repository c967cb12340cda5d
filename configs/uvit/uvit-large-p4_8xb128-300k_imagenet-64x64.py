# U-ViT-L/4 on ImageNet 64x64, class-conditional (1000 classes, no guidance), continuous VP-SDE
# (official FID 4.26).
_base_ = ['../_base_/uvit_imagenet.py']
model = dict(network=dict(arch='large', img_size=64, patch_size=4, in_channels=3, num_classes=1000))
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='ResizeEdge', scale=64, edge='short', backend='pillow', interpolation='bicubic'),
    dict(type='CenterCrop', crop_size=64),
    dict(type='RandomFlip', prob=0.5, direction='horizontal'),
    dict(type='PackInputs'),
]
train_dataloader = dict(dataset=dict(pipeline=train_pipeline))
optim_wrapper = dict(optimizer=dict(lr=3e-4))
