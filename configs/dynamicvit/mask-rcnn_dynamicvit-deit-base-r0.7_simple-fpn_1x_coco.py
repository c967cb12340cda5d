# Mask R-CNN 1x with DynamicViT-DeiT-B/0.7: mmdet's R-50 FPN 1x recipe with the backbone swapped for a plain ViT
# and FPN for ViTDet's simple feature pyramid (strides 4-64 from the single stride-16 map). Tokens pruned by the
# backbone come back into the map with the features they had when dropped, as SViT keeps them.
# Training memory (docs/dynamicvit.md): a step at keep 1.0 / 0.7 (batch 2, 800x1333) peaks 6.6 / 8.5 GiB above
# the model and optimizer state; with 112 M parameters about 11 GiB per GPU (measured on CPU).
_base_ = ['mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py']
custom_imports = dict(imports=['sparsevit_mm'], allow_failed_imports=False)

# Official DeiT-B ImageNet weights (converted on the fly; the score predictors start from scratch). An ImageNet
# DynamicViT checkpoint (configs/dynamicvit/dynamicvit-deit-base_r0.7_8xb128-30e_in1k.py) works as well.
pretrained = 'pretrained/deit_base_patch16_224-b5f2ef4d.pth'
model = dict(
    # image sides must be multiples of the patch (16) and of the coarsest pyramid stride (32)
    data_preprocessor=dict(pad_size_divisor=32),
    backbone=dict(
        _delete_=True,
        type='DynamicViT',
        arch='deit-base',
        img_size=224,  # the position embedding is resized to each input
        patch_size=16,
        keep_ratio=0.7,
        out_type='featmap',
        out_indices=(11, ),
        drop_path_rate=0.2,
        init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    neck=dict(_delete_=True, type='SimpleFeaturePyramid', in_channels=768, out_channels=256, num_outs=5))

# AdamW instead of the R-50 recipe's SGD; no weight decay on the position embedding and cls token
optim_wrapper = dict(
    optimizer=dict(_delete_=True, type='AdamW', lr=1e-4, betas=(0.9, 0.999), weight_decay=0.1),
    paramwise_cfg=dict(custom_keys={'pos_embed': dict(decay_mult=0.0), 'cls_token': dict(decay_mult=0.0)}))
custom_hooks = [dict(type='KeepRatioLossHook'), dict(type='RandomStateHook'), dict(type='CheckpointLayoutHook')]
