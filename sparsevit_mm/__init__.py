"""sparsevit-mm: dynamic, input-adaptive vision backbones for OpenMMLab 2.x.

``import sparsevit_mm`` (what ``custom_imports=dict(imports=['sparsevit_mm'])`` does) registers every model, hook
and metric into mmengine's root registries, which mmpretrain's, mmdet's and mmseg's registries inherit (see
:mod:`sparsevit_mm.registry`); nothing else happens at import, and no model code is imported until a model is built.
"""
import importlib

from .registry import REGISTERED
from .version import __version__

__all__ = ['REGISTERED', '__version__']

_SUBPACKAGES = ('apis', 'engine', 'evaluation', 'layers', 'models', 'utils')


def __getattr__(name: str):
    # ``sparsevit_mm.models.DynamicViT`` works after a bare ``import sparsevit_mm``, importing on first use
    if name in _SUBPACKAGES:
        return importlib.import_module(f'.{name}', __name__)
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
