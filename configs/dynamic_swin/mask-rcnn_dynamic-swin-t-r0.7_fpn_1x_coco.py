# mmdet's own Mask R-CNN Swin-T 1x recipe; the only change is the backbone (tools/train.py adds the
# KeepRatioLossHook by itself; with mmdet's own tools/train.py keep the `custom_hooks` line below).
_base_ = ['mmdet::swin/mask-rcnn_swin-t-p4-w7_fpn_1x_coco.py']
custom_imports = dict(imports=['sparsevit_mm'], allow_failed_imports=False)

# An ImageNet DynamicSwin-T/0.7 checkpoint: the official one or one trained with
# configs/dynamic_swin/dynamic-swin-t_r0.7_8xb128x4-120e_in1k.py (a plain Swin-T checkpoint works too: the
# predictors and fast paths then start from scratch).
pretrained = 'pretrained/dynamic-swin-t_r0.7_in1k.pth'
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
