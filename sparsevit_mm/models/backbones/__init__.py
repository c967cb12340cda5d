"""Backbones, one module per family; each is imported when one of its names is first used."""
from ...utils.lazy import lazy_exports

_EXPORTS = {
    'SparseBackbone': '.base', 'TokenSparsityResult': '.base',
    'DynamicViT': '.dynamic_vit',
    'DynamicSwinTransformer': '.dynamic_swin', 'DynamicSwinBlock': '.dynamic_swin',
    'DynamicConvNeXt': '.dynamic_convnext', 'DynamicConvNeXtBlock': '.dynamic_convnext',
    'DVTExit': '.dvt_exit',
    'UViT': '.uvit', 'UViTBackbone': '.uvit',
}
__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
