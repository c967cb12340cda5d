# U-ViT-L/4 on ImageNet 512 (latent 64x64), continuous VP-SDE, guidance 0.7 (official FID 4.67).
# Latent diffusion: images are encoded on the fly by Stable Diffusion's KL-f8 autoencoder (a local file; see the
# README) at scale factor 0.18215; classifier-free guidance with 1001 labels (1000 = null).
_base_ = ['../_base_/uvit_imagenet.py']
model = dict(
    network=dict(arch='large', img_size=64, patch_size=4, in_channels=4, num_classes=1001),
    schedule='continuous',
    p_uncond=0.15,
    autoencoder=dict(checkpoint='pretrained/autoencoder_kl.pth', scale_factor=0.18215),
    sampler=dict(steps=50, order=3, guidance=0.7))
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='ResizeEdge', scale=512, edge='short', backend='pillow', interpolation='bicubic'),
    dict(type='CenterCrop', crop_size=512),
    dict(type='RandomFlip', prob=0.5, direction='horizontal'),
    dict(type='PackInputs'),
]
train_dataloader = dict(dataset=dict(pipeline=train_pipeline))
train_cfg = dict(max_iters=500000)
