# mmdet's own Mask R-CNN Swin-T 3x (multi-scale + crop) recipe with the backbone swapped.
_base_ = ['mmdet::swin/mask-rcnn_swin-t-p4-w7_fpn_ms-crop-3x_coco.py']
custom_imports = dict(imports=['sparsevit_mm'], allow_failed_imports=False)

pretrained = 'pretrained/dynamic-swin-t_r0.7_in1k.pth'  # see the 1x config
model = dict(
    backbone=dict(
        _delete_=True,
        type='DynamicSwinTransformer',
        arch='tiny',
        keep_ratio=0.7,
        drop_path_rate=0.2,
        out_indices=(0, 1, 2, 3),
        init_cfg=dict(type='Pretrained', checkpoint=pretrained)))
custom_hooks = [dict(type='KeepRatioLossHook'), dict(type='RandomStateHook'), dict(type='CheckpointLayoutHook')]
