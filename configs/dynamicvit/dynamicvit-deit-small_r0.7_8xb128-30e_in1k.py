_base_ = ['../_base_/dynamicvit_8xb128-30e_in1k.py']

# Official DeiT-S weights (student init and frozen teacher); converted on the fly. Model zoo: 79.32 top-1, 2.9 GFLOPs.
pretrained = 'pretrained/deit_small_patch16_224-cd65a155.pth'
model = dict(
    backbone=dict(arch='deit-small', keep_ratio=0.7),
    head=dict(in_channels=384),
    teacher=dict(checkpoint=pretrained),  # the dense model of the same arch, frozen
    init_cfg=dict(type='Pretrained', checkpoint=pretrained),
)
