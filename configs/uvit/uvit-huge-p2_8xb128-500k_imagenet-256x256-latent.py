# U-ViT-H/2 on ImageNet 256 (latent 32x32), discrete SD schedule + DPM-Solver++, p_uncond 0.1, guidance 0.4
# (official FID 2.29).
# Latent diffusion: images are encoded on the fly by Stable Diffusion's KL-f8 autoencoder (a local file; see the
# README) at scale factor 0.18215; classifier-free guidance with 1001 labels (1000 = null).
_base_ = ['../_base_/uvit_imagenet.py']
model = dict(
    network=dict(arch='huge', img_size=32, patch_size=2, in_channels=4, num_classes=1001),
    schedule='discrete',
    p_uncond=0.1,
    autoencoder=dict(checkpoint='pretrained/autoencoder_kl_ema.pth', scale_factor=0.18215),
    sampler=dict(steps=50, order=3, guidance=0.4))
train_cfg = dict(max_iters=500000)
