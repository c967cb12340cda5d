"""The one place where sparsevit-mm's classes enter the OpenMMLab registries.

Every class below is registered under its own name into the registries of each installed framework (mmpretrain,
mmdet, mmseg), so configs with ``default_scope`` ``'mmpretrain'``, ``'mmdet'`` or ``'mmseg'`` find
``type='DynamicViT'`` without a scope prefix. Names are distinct from the frameworks' own (their
``SwinTransformer`` / ``ConvNeXt`` / ``VisionTransformer`` stay untouched).
"""
import importlib

from .engine import CheckpointLayoutHook, FreezeBackboneHook, KeepRatioLossHook, RandomStateHook
from .evaluation import EarlyExitMetric
from .models import (DVT, DVTExit, DynamicConvNeXt, DynamicSwinTransformer, DynamicViT, DynamicViTClassifier,
                     SimpleFeaturePyramid, TokenLabelingClsHead, UViT, UViTBackbone, UViTDiffusion)

SPARSE_BACKBONES = [DynamicViT, DynamicSwinTransformer, DynamicConvNeXt]
HOOKS = [CheckpointLayoutHook, FreezeBackboneHook, KeepRatioLossHook, RandomStateHook]

# framework -> registry name -> classes
REGISTRATIONS = {
    'mmpretrain': {
        'MODELS': [*SPARSE_BACKBONES, DynamicViTClassifier, TokenLabelingClsHead, DVT, DVTExit, UViT, UViTDiffusion],
        'HOOKS': HOOKS,
        'METRICS': [EarlyExitMetric],
    },
    'mmdet': {
        'MODELS': [*SPARSE_BACKBONES, SimpleFeaturePyramid],
        'HOOKS': HOOKS,
    },
    'mmseg': {
        'MODELS': [*SPARSE_BACKBONES, UViTBackbone, SimpleFeaturePyramid],
        'HOOKS': HOOKS,
    },
}


def register_all():
    """Register into every installed framework; returns {framework: [class names]}. Idempotent."""
    registered = {}
    for framework, registries in REGISTRATIONS.items():
        try:
            module = importlib.import_module(f'{framework}.registry')
        except ImportError:
            continue  # that framework is not installed
        for registry_name, classes in registries.items():
            registry = getattr(module, registry_name)
            for cls in classes:
                if registry.module_dict.get(cls.__name__) is not cls:
                    registry.register_module(module=cls, name=cls.__name__)
            registered.setdefault(framework, []).extend(cls.__name__ for cls in classes)
    return registered


REGISTERED = register_all()
