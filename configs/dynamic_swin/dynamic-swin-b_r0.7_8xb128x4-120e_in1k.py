_base_ = ['../_base_/dynamic-hierarchical_8xb128x4-120e_in1k.py']

# Official Swin-B weights. Model zoo: 83.43 top-1, 12.1 GFLOPs.
pretrained = 'pretrained/swin_base_patch4_window7_224.pth'
backbone = dict(type='DynamicSwinTransformer', arch='base', out_indices=(3, ), pad_small_map=False)
model = dict(
    backbone=dict(backbone, keep_ratio=0.7, drop_path_rate=0.5),
    neck=dict(type='GlobalAveragePooling'),
    head=dict(in_channels=1024),
    teacher=dict(
        model=dict(
            type='ImageClassifier',
            backbone=dict(backbone, keep_ratio=1.0),
            neck=dict(type='GlobalAveragePooling'),
            head=dict(type='LinearClsHead', num_classes=1000, in_channels=1024)),
        checkpoint=pretrained),
    init_cfg=dict(type='Pretrained', checkpoint=pretrained),
)
