"""The one place where sparsevit-mm's classes enter the OpenMMLab registries.

Where: mmengine's root registries (``MODELS``, ``HOOKS``, ``METRICS``). mmpretrain's, mmdet's and mmseg's registries
are their children, and a registry that does not hold a name asks its parents, so ``type='DynamicViT'`` builds under
any ``default_scope`` without a prefix (and ``'mmdet.DynamicViT'`` too), while every framework's own names come first:
its ``SwinTransformer`` / ``ConvNeXt`` / ``VisionTransformer`` stay its own.

When: lazily. Each name is registered as a small builder that imports the module defining the class on its first
build and then puts the class itself in its place, so ``import sparsevit_mm`` imports mmengine's registry and
nothing of the frameworks' model code, and a config imports only the classes it builds. (mmengine's own lazy import,
a registry's ``locations``, imports every listed module on the registry's first lookup: an mmpretrain config with
DynamicViT would then import mmdet's models too, for DynamicSwinTransformer, which is built on mmdet's Swin blocks.)
:func:`get_class` gives the class behind a name.
"""
import importlib
from typing import Callable, Dict, Optional

from mmengine import registry as mmengine_registry

# registry -> class name -> the module defining it
REGISTRATIONS: Dict[str, Dict[str, str]] = {
    'MODELS': {
        'DynamicViT': 'sparsevit_mm.models.backbones.dynamic_vit',
        'DynamicSwinTransformer': 'sparsevit_mm.models.backbones.dynamic_swin',
        'DynamicConvNeXt': 'sparsevit_mm.models.backbones.dynamic_convnext',
        'DVTExit': 'sparsevit_mm.models.backbones.dvt_exit',
        'UViT': 'sparsevit_mm.models.backbones.uvit',
        'UViTBackbone': 'sparsevit_mm.models.backbones.uvit',
        'SimpleFeaturePyramid': 'sparsevit_mm.models.necks.simple_feature_pyramid',
        'TokenLabelingClsHead': 'sparsevit_mm.models.heads.token_labeling_head',
        'DynamicViTClassifier': 'sparsevit_mm.models.classifiers.dynamic_vit_classifier',
        'DVT': 'sparsevit_mm.models.classifiers.dvt',
        'UViTDiffusion': 'sparsevit_mm.models.diffusion.uvit_diffusion',
    },
    'HOOKS': {
        'CheckpointLayoutHook': 'sparsevit_mm.engine.hooks',
        'FreezeBackboneHook': 'sparsevit_mm.engine.hooks',
        'KeepRatioLossHook': 'sparsevit_mm.engine.hooks',
        'RandomStateHook': 'sparsevit_mm.engine.random_state',
    },
    'METRICS': {
        'EarlyExitMetric': 'sparsevit_mm.evaluation.dvt_metric',
    },
}


def get_class(name: str) -> Optional[type]:
    """The class registered as ``name`` (its module imported now, if it was not), or None for a name not ours."""
    for registry_name, classes in REGISTRATIONS.items():
        if name in classes:
            return _resolve(registry_name, name)
    return None


def _resolve(registry_name: str, name: str) -> type:
    cls = getattr(importlib.import_module(REGISTRATIONS[registry_name][name]), name)
    registry = getattr(mmengine_registry, registry_name)
    if registry.module_dict.get(name) is not cls:
        registry.register_module(name=name, module=cls, force=True)
    return cls


def _lazy_builder(registry_name: str, name: str) -> Callable:
    def build(*args, **kwargs):
        return _resolve(registry_name, name)(*args, **kwargs)

    module = REGISTRATIONS[registry_name][name]
    build.__name__ = build.__qualname__ = name
    build.__module__ = module
    build.__doc__ = f'Builds ``{module}.{name}`` (the module is imported on first use).'
    return build


def register_all() -> Dict[str, list]:
    """Register every name (as a lazy builder unless its class is already there); returns {registry: [names]}.
    Idempotent."""
    for registry_name, classes in REGISTRATIONS.items():
        registry = getattr(mmengine_registry, registry_name)
        for name in classes:
            current = registry.module_dict.get(name)
            if current is None or getattr(current, '__module__', None) != classes[name]:
                registry.register_module(name=name, module=_lazy_builder(registry_name, name), force=True)
    return {registry_name: list(classes) for registry_name, classes in REGISTRATIONS.items()}


REGISTERED = register_all()
