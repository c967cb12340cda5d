_base_ = ['../_base_/dynamic-hierarchical_8xb128x4-120e_in1k.py']

# Official ConvNeXt-B weights. Model zoo: 83.45 top-1, 10.2 GFLOPs (0.9: 83.96, 11.9).
pretrained = 'pretrained/convnext_base_1k_224_ema.pth'
model = dict(
    backbone=dict(type='DynamicConvNeXt', arch='base', keep_ratio=0.7, drop_path_rate=0.5),
    head=dict(in_channels=1024),
    teacher=dict(checkpoint=pretrained),  # the dense model of the same arch, frozen
    init_cfg=dict(type='Pretrained', checkpoint=pretrained),
)
