from .base import SparseBackbone, TokenSparsityResult
from .dynamic_convnext import DynamicConvNeXt, DynamicConvNeXtBlock
from .dynamic_swin import DynamicSwinBlock, DynamicSwinTransformer
from .dynamic_vit import DynamicViT

__all__ = ['SparseBackbone', 'TokenSparsityResult', 'DynamicConvNeXt', 'DynamicConvNeXtBlock', 'DynamicSwinBlock',
           'DynamicSwinTransformer', 'DynamicViT']
