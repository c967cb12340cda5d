# Mask R-CNN 1x with DynamicConvNeXt-T/0.7: mmdet's Swin-T 1x recipe (mmdet ships no ConvNeXt 1x config) with the
# backbone swapped; ConvNeXt-T and Swin-T have the same stage widths, so the FPN is unchanged.
_base_ = ['mmdet::swin/mask-rcnn_swin-t-p4-w7_fpn_1x_coco.py']
custom_imports = dict(imports=['sparsevit_mm'], allow_failed_imports=False)

pretrained = 'pretrained/dynamic-convnext-t_r0.7_in1k.pth'  # see the 3x config
model = dict(
    backbone=dict(
        _delete_=True,
        type='DynamicConvNeXt',
        arch='tiny',
        keep_ratio=0.7,
        drop_path_rate=0.4,
        out_indices=(0, 1, 2, 3),
        gap_before_final_norm=False,
        init_cfg=dict(type='Pretrained', checkpoint=pretrained)))
custom_hooks = [dict(type='KeepRatioLossHook'), dict(type='RandomStateHook'), dict(type='CheckpointLayoutHook')]
