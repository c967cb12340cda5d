"""Models, one module per family; each is imported when one of its names is first used (the families are built on
different frameworks: DynamicSwinTransformer on mmdet's Swin blocks, DynamicConvNeXt on mmpretrain's ConvNeXt)."""
from ..utils.lazy import lazy_exports

_EXPORTS = {
    'DynamicViT': '.backbones.dynamic_vit',
    'DynamicSwinTransformer': '.backbones.dynamic_swin',
    'DynamicConvNeXt': '.backbones.dynamic_convnext',
    'DVTExit': '.backbones.dvt_exit',
    'UViT': '.backbones.uvit', 'UViTBackbone': '.backbones.uvit',
    'DVT': '.classifiers.dvt',
    'DynamicViTClassifier': '.classifiers.dynamic_vit_classifier',
    'UViTDiffusion': '.diffusion.uvit_diffusion',
    'TokenLabelingClsHead': '.heads.token_labeling_head',
    'SimpleFeaturePyramid': '.necks.simple_feature_pyramid',
    'FrozenTeacher': '.teacher',
}
__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
