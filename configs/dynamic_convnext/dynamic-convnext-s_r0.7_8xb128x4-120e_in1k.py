_base_ = ['../_base_/dynamic-hierarchical_8xb128x4-120e_in1k.py']

# Official ConvNeXt-S weights. Model zoo: 82.57 top-1, 5.8 GFLOPs (0.9: 83.12, 6.8).
pretrained = 'pretrained/convnext_small_1k_224_ema.pth'
model = dict(
    backbone=dict(type='DynamicConvNeXt', arch='small', keep_ratio=0.7, drop_path_rate=0.2),
    head=dict(in_channels=768),
    teacher=dict(checkpoint=pretrained),  # the dense model of the same arch, frozen
    init_cfg=dict(type='Pretrained', checkpoint=pretrained),
)
