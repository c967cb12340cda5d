# mmseg's own UperNet ConvNeXt-T 160k ADE20K recipe (AMP, layer-wise lr decay) with the backbone swapped.
_base_ = ['mmseg::convnext/convnext-tiny_upernet_8xb2-amp-160k_ade20k-512x512.py']
custom_imports = dict(imports=['sparsevit_mm'], allow_failed_imports=False)

pretrained = 'pretrained/dynamic-convnext-t_r0.7_in1k.pth'  # see configs/dynamic_convnext/mask-rcnn_*_3x_coco.py
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
