_base_ = ['../_base_/dynamicvit_8xb128-30e_in1k.py']

# Official DeiT-B weights. DeiT-B uses drop path 0.2 and keep-ratio weight 5.0 (official README). Model zoo: 81.43 top-1, 11.4 GFLOPs.
pretrained = 'pretrained/deit_base_patch16_224-b5f2ef4d.pth'
model = dict(
    backbone=dict(arch='deit-base', keep_ratio=0.7, drop_path_rate=0.2),
    head=dict(in_channels=768),
    teacher=dict(checkpoint=pretrained),  # the dense model of the same arch, frozen
    init_cfg=dict(type='Pretrained', checkpoint=pretrained),
    keep_ratio_weight=5.0,
)
