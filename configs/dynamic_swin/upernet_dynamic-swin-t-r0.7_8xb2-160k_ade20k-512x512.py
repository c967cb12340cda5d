# mmseg's own UperNet Swin-T 160k ADE20K recipe with the backbone swapped.
_base_ = ['mmseg::swin/swin-tiny-patch4-window7-in1k-pre_upernet_8xb2-160k_ade20k-512x512.py']
custom_imports = dict(imports=['sparsevit_mm'], allow_failed_imports=False)

pretrained = 'pretrained/dynamic-swin-t_r0.7_in1k.pth'  # see configs/dynamic_swin/mask-rcnn_*_1x_coco.py
model = dict(
    backbone=dict(
        _delete_=True,
        type='DynamicSwinTransformer',
        arch='tiny',
        keep_ratio=0.7,
        drop_path_rate=0.3,
        out_indices=(0, 1, 2, 3),
        init_cfg=dict(type='Pretrained', checkpoint=pretrained)))
custom_hooks = [dict(type='KeepRatioLossHook'), dict(type='RandomStateHook'), dict(type='CheckpointLayoutHook')]
