from .backbones import DVTExit, DynamicConvNeXt, DynamicSwinTransformer, DynamicViT
from .classifiers import DVT, DynamicViTClassifier
from .heads import TokenLabelingClsHead
from .teacher import FrozenTeacher

__all__ = ['DVTExit', 'DynamicConvNeXt', 'DynamicSwinTransformer', 'DynamicViT', 'DVT', 'DynamicViTClassifier',
           'TokenLabelingClsHead', 'FrozenTeacher']
