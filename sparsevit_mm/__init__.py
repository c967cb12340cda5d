"""sparsevit-mm: dynamic, input-adaptive vision backbones for OpenMMLab 2.x.

``import sparsevit_mm`` (what ``custom_imports=dict(imports=['sparsevit_mm'])`` does) registers every model into
the installed mmpretrain / mmdet / mmseg registries; nothing else happens at import.
"""
from .registry import REGISTERED
from .version import __version__

__all__ = ['REGISTERED', '__version__']
