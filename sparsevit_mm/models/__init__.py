from .backbones import DynamicConvNeXt, DynamicSwinTransformer, DynamicViT
from .classifiers import DynamicViTClassifier
from .heads import TokenLabelingClsHead
from .teacher import FrozenTeacher

__all__ = ['DynamicConvNeXt', 'DynamicSwinTransformer', 'DynamicViT', 'DynamicViTClassifier', 'TokenLabelingClsHead',
           'FrozenTeacher']
