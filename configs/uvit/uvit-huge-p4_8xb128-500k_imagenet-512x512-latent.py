# uvit-huge-p4_8xb128-500k_imagenet-512x512-latent.py1
# Latent diffusion: images are encoded on the fly by Stable Diffusion's KL-f8 autoencoder (a local file; see README)
# at scale factor 0.18215; classifier-free guidance with 1001 labels (1000 = null).
_base_ = ['../_base_/uvit_runtime.py']
model = dict(
    type='UViTDiffusion',
    network=dict(type='UViT', arch='huge', img_size=64, patch_size=4, in_channels=4, num_classes=1001,
                 use_checkpoint=True),
    schedule='discrete',
    p_uncond=0.1,
    autoencoder=dict(checkpoint='uvit-huge-p4_8xb128-500k_imagenet-512x512-latent.py0', scale_factor=0.18215),
    sampler=dict(steps=50, order=3, guidance=0.7))
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='ResizeEdge', scale=512, edge='short', backend='pillow', interpolation='bicubic'),
    dict(type='CenterCrop', crop_size=512),
    dict(type='RandomFlip', prob=0.5, direction='horizontal'),
    dict(type='PackInputs'),
]
train_dataloader = dict(
    batch_size=128,  # x 8 GPUs = 1024
    num_workers=8,
    sampler=dict(type='InfiniteSampler', shuffle=True),
    dataset=dict(type='ImageNet', data_root='data/imagenet', split='train', pipeline=train_pipeline))
train_cfg = dict(max_iters=500000)
