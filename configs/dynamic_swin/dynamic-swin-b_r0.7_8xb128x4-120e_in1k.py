_base_ = ['../_base_/dynamic-hierarchical_8xb128x4-120e_in1k.py']

# Official Swin-B weights. Model zoo: 83.43 top-1, 12.1 GFLOPs.
pretrained = 'pretrained/swin_base_patch4_window7_224.pth'
model = dict(
    backbone=dict(type='DynamicSwinTransformer', arch='base', out_indices=(3, ), pad_small_map=False, keep_ratio=0.7, drop_path_rate=0.5),
    neck=dict(type='GlobalAveragePooling'),
    head=dict(in_channels=1024),
    teacher=dict(checkpoint=pretrained),  # the dense model of the same arch, frozen
    init_cfg=dict(type='Pretrained', checkpoint=pretrained),
)
