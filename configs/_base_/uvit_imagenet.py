# ImageNet for U-ViT: class-conditional, short side resized and centre-cropped (256 px here; children set
# other sizes), horizontal flips, global batch 8 x 128 = 1024. Latent children add the autoencoder.
_base_ = ['./uvit_runtime.py']
model = dict(
    type='UViTDiffusion',
    network=dict(type='UViT', with_cp=True),
    schedule='continuous')
image_size = 256
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='ResizeEdge', scale=image_size, edge='short', backend='pillow', interpolation='bicubic'),
    dict(type='CenterCrop', crop_size=image_size),
    dict(type='RandomFlip', prob=0.5, direction='horizontal'),
    dict(type='PackInputs'),
]
train_dataloader = dict(
    batch_size=128,
    num_workers=8,
    sampler=dict(type='InfiniteSampler', shuffle=True),
    dataset=dict(type='ImageNet', data_root='data/imagenet', split='train', pipeline=train_pipeline))
