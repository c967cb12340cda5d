_base_ = ['../_base_/dynamic-hierarchical_8xb128x4-120e_in1k.py']

# Official Swin-S weights. Model zoo: 83.21 top-1, 6.9 GFLOPs.
pretrained = 'pretrained/swin_small_patch4_window7_224.pth'
model = dict(
    backbone=dict(type='DynamicSwinTransformer', arch='small', out_indices=(3, ), pad_small_map=False, keep_ratio=0.7, drop_path_rate=0.2),
    neck=dict(type='GlobalAveragePooling'),
    head=dict(in_channels=768),
    teacher=dict(checkpoint=pretrained),  # the dense model of the same arch, frozen
    init_cfg=dict(type='Pretrained', checkpoint=pretrained),
)
