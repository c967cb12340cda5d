_base_ = ['../_base_/dynamicvit_8xb128-30e_in1k.py']

# A dense DeiT-256 (official DynamicViT pretrained-base link), converted on the fly. Model zoo: 76.53 top-1, 1.3 GFLOPs.
pretrained = 'pretrained/deit_256.pth'
model = dict(
    backbone=dict(arch='deit-256', keep_ratio=0.7),
    head=dict(in_channels=256),
    teacher=dict(checkpoint=pretrained),  # the dense model of the same arch, frozen
    init_cfg=dict(type='Pretrained', checkpoint=pretrained),
)
