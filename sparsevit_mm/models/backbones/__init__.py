from .dynamic_vit import DynamicViT

__all__ = ['DynamicViT']
