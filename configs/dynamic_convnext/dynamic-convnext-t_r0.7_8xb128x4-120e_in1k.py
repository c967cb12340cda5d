_base_ = ['../_base_/dynamic-hierarchical_8xb128x4-120e_in1k.py']

# Official ConvNeXt-T weights (student init and frozen teacher; converted on the fly). Model zoo: 81.59 top-1, 3.6 GFLOPs (0.9: 82.06, 3.9).
pretrained = 'pretrained/convnext_tiny_1k_224_ema.pth'
model = dict(
    backbone=dict(type='DynamicConvNeXt', arch='tiny', keep_ratio=0.7, drop_path_rate=0.2),
    head=dict(in_channels=768),
    teacher=dict(checkpoint=pretrained),  # the dense model of the same arch, frozen
    init_cfg=dict(type='Pretrained', checkpoint=pretrained),
)
