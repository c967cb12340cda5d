_base_ = ['../_base_/dynamic-hierarchical_8xb128x4-120e_in1k.py']

# Official ConvNeXt-T weights. Model zoo: 82.06 top-1, 3.9 GFLOPs.
pretrained = 'pretrained/convnext_tiny_1k_224_ema.pth'
model = dict(
    backbone=dict(type='DynamicConvNeXt', arch='tiny', keep_ratio=0.9, drop_path_rate=0.2),
    head=dict(in_channels=768),
    teacher=dict(checkpoint=pretrained),  # the dense model of the same arch, frozen
    init_cfg=dict(type='Pretrained', checkpoint=pretrained),
)
