# mmdet's own Mask R-CNN ConvNeXt-T 3x (multi-scale + crop, AMP, layer-wise lr decay) recipe with the backbone
# swapped. The class name keeps "ConvNeXt" and mmpretrain's parameter names, so mmdet's layer-decay optimizer
# constructor applies unchanged.
_base_ = ['mmdet::convnext/mask-rcnn_convnext-t-p4-w7_fpn_amp-ms-crop-3x_coco.py']
custom_imports = dict(imports=['sparsevit_mm'], allow_failed_imports=False)

# An ImageNet DynamicCNN-T/0.7 checkpoint: the official one or one trained with
# configs/dynamic_convnext/dynamic-convnext-t_r0.7_8xb128x4-120e_in1k.py.
pretrained = 'pretrained/dynamic-convnext-t_r0.7_in1k.pth'
model = dict(
    backbone=dict(
        _delete_=True,
        type='DynamicConvNeXt',
        arch='tiny',
        keep_ratio=0.7,
        drop_path_rate=0.4,
        layer_scale_init_value=1.0,
        out_indices=(0, 1, 2, 3),
        gap_before_final_norm=False,
        init_cfg=dict(type='Pretrained', checkpoint=pretrained, prefix='backbone.')))
custom_hooks = [dict(type='KeepRatioLossHook'), dict(type='RandomStateHook'), dict(type='CheckpointLayoutHook')]
