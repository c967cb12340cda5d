from .dvt import DVT
from .dynamic_vit_classifier import DynamicViTClassifier

__all__ = ['DVT', 'DynamicViTClassifier']
