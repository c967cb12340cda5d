from .base import SparseBackbone, TokenSparsityResult
from .dynamic_convnext import DynamicConvNeXt, DynamicConvNeXtBlock
from .dynamic_swin import DynamicSwinBlock, DynamicSwinTransformer
from .dvt_exit import DVTExit
from .dynamic_vit import DynamicViT
from .uvit import UViT, UViTBackbone

__all__ = ['DVTExit', 'SparseBackbone', 'TokenSparsityResult', 'DynamicConvNeXt', 'DynamicConvNeXtBlock', 'DynamicSwinBlock',
           'DynamicSwinTransformer', 'DynamicViT', 'UViT', 'UViTBackbone']
