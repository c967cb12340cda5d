# U-ViT-S as a segmentation backbone: mmseg's own UperNet 160k ADE20K recipe with the backbone swapped for
# UViTBackbone (fixed timestep, no label; one stride-16 token map) and ViTDet's simple feature pyramid making
# strides 4 / 8 / 16 / 32 from it.
_base_ = ['mmseg::swin/swin-tiny-patch4-window7-in1k-pre_upernet_8xb2-160k_ade20k-512x512.py']
custom_imports = dict(imports=['sparsevit_mm'], allow_failed_imports=False)
model = dict(
    backbone=dict(_delete_=True, type='UViTBackbone', arch='small', img_size=512, patch_size=16),
    neck=dict(type='SimpleFeaturePyramid', in_channels=512, out_channels=512, scale_factors=(4.0, 2.0, 1.0, 0.5),
              num_outs=4),
    decode_head=dict(in_channels=[512, 512, 512, 512]),
    auxiliary_head=dict(in_channels=512))
