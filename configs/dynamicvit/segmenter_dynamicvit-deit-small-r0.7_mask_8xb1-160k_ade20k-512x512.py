# Segmenter (mask head) with DynamicViT-DeiT-S/0.7: mmseg's segmenter_vit-s 160k ADE20K recipe, backbone swapped.
# Like upstream's VisionTransformer: final norm on, one (B, C, H/16, W/16) map from the last block, no cls token.
# Training memory (docs/dynamicvit.md): a step at keep 1.0 / 0.7 (batch 1, 512x512) peaks 0.85 / 0.97 GiB above
# the model and optimizer state; with 26 M parameters about 2.5 GiB per GPU (measured on CPU).
_base_ = ['mmseg::segmenter/segmenter_vit-s_mask_8xb1-160k_ade20k-512x512.py']
custom_imports = dict(imports=['sparsevit_mm'], allow_failed_imports=False)

pretrained = 'pretrained/deit_small_patch16_224-cd65a155.pth'
model = dict(
    # DeiT weights were trained on ImageNet-normalised inputs (upstream's 127.5 suits its AugReg ViT weights);
    # test images are padded to a multiple of the patch size, which DynamicViT needs (predictions are cropped back)
    data_preprocessor=dict(mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375],
                           test_cfg=dict(size_divisor=16)),
    pretrained=None,  # upstream's model-level checkpoint would be passed to the backbone; init_cfg loads ours
    backbone=dict(
        _delete_=True,
        type='DynamicViT',
        arch='deit-small',
        img_size=224,
        patch_size=16,
        keep_ratio=0.7,
        out_type='featmap',
        out_indices=-1,
        final_norm=True,
        drop_path_rate=0.1,
        init_cfg=dict(type='Pretrained', checkpoint=pretrained)))
custom_hooks = [dict(type='KeepRatioLossHook'), dict(type='RandomStateHook'), dict(type='CheckpointLayoutHook')]
