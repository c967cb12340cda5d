from .dynamic_vit_classifier import DynamicViTClassifier

__all__ = ['DynamicViTClassifier']
