from .backbones import DynamicViT
from .classifiers import DynamicViTClassifier
from .heads import TokenLabelingClsHead
from .teacher import FrozenTeacher

__all__ = ['DynamicViT', 'DynamicViTClassifier', 'TokenLabelingClsHead', 'FrozenTeacher']
