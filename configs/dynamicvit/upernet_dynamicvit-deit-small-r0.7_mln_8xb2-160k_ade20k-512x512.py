# UperNet with DynamicViT-DeiT-S/0.7: mmseg's vit_deit-s16_mln_upernet 160k ADE20K recipe, backbone swapped.
# Like upstream's VisionTransformer: blocks 3, 6, 9, 12 as (B, C, H/16, W/16) maps, no final norm; pruned tokens
# come back into the maps with the features they had when dropped; MultiLevelNeck rescales them (x4, x2, x1, x0.5).
# Training memory (docs/dynamicvit.md): a step at keep 1.0 / 0.7 (batch 2, 512x512) peaks 2.74 / 2.97 GiB above
# the model and optimizer state; with 58 M parameters about 5 GiB per GPU (measured on CPU).
_base_ = ['mmseg::vit/vit_deit-s16_mln_upernet_8xb2-160k_ade20k-512x512.py']
custom_imports = dict(imports=['sparsevit_mm'], allow_failed_imports=False)

pretrained = 'pretrained/deit_small_patch16_224-cd65a155.pth'
model = dict(
    # test images are padded to a multiple of the patch size, which DynamicViT needs (predictions are cropped back)
    data_preprocessor=dict(test_cfg=dict(size_divisor=16)),
    pretrained=None,  # upstream's model-level checkpoint would be passed to the backbone; init_cfg loads ours
    backbone=dict(
        _delete_=True,
        type='DynamicViT',
        arch='deit-small',
        img_size=224,
        patch_size=16,
        keep_ratio=0.7,
        out_type='featmap',
        out_indices=(2, 5, 8, 11),
        final_norm=False,
        drop_path_rate=0.1,
        init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    neck=dict(type='MultiLevelNeck', in_channels=[384, 384, 384, 384], out_channels=384, scales=[4, 2, 1, 0.5]),
    decode_head=dict(in_channels=[384, 384, 384, 384]),
    auxiliary_head=dict(in_channels=384))
custom_hooks = [dict(type='KeepRatioLossHook'), dict(type='RandomStateHook'), dict(type='CheckpointLayoutHook')]
