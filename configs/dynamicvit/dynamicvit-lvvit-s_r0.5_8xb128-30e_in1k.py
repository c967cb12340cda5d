_base_ = ['../_base_/dynamicvit_8xb128-30e_in1k.py']

# Official LV-ViT-S weights. Model zoo: 81.97 top-1, 3.7 GFLOPs.
# LV-ViT predicts cls logits + 0.5 * max over tokens of per-token logits; tokens are distilled with KL on the
# per-token logits (the official LV-ViT recipe).
pretrained = 'pretrained/lvvit_s-26M-224-83.3.pth.tar'
model = dict(
    backbone=dict(arch='lvvit-s', keep_ratio=0.5, out_type='raw'),
    head=dict(_delete_=True, type='TokenLabelingClsHead', num_classes=1000, in_channels=384,
              loss=dict(type='LabelSmoothLoss', label_smooth_val=0.1, mode='original')),
    token_distill='kl',
    teacher=dict(checkpoint=pretrained),  # the dense model of the same arch, frozen
    init_cfg=dict(type='Pretrained', checkpoint=pretrained),
)
