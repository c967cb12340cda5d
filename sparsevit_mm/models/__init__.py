from .backbones import DVTExit, DynamicConvNeXt, DynamicSwinTransformer, DynamicViT, UViT, UViTBackbone
from .classifiers import DVT, DynamicViTClassifier
from .diffusion import UViTDiffusion
from .heads import TokenLabelingClsHead
from .necks import SimpleFeaturePyramid
from .teacher import FrozenTeacher

__all__ = ['DVTExit', 'DynamicConvNeXt', 'DynamicSwinTransformer', 'DynamicViT', 'UViT', 'UViTBackbone', 'DVT',
           'DynamicViTClassifier', 'UViTDiffusion', 'TokenLabelingClsHead', 'FrozenTeacher',
           'SimpleFeaturePyramid']
