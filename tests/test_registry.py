"""`import sparsevit_mm` registers every model by bare name for every framework, and imports no model code."""
import importlib
import json
import subprocess
import sys

import pytest
from mmengine.registry import DefaultScope

import sparsevit_mm

from .helpers import REPO

FRAMEWORK_MODELS = ('mmpretrain.models', 'mmdet.models', 'mmseg.models')


def fresh_interpreter(code: str) -> dict:
    """Run ``code`` in a new interpreter (nothing of ours imported yet); it prints one JSON object, returned."""
    proc = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize('framework', ['mmpretrain', 'mmdet', 'mmseg'])
def test_models_registered_in_every_framework(framework):
    registry = importlib.import_module(f'{framework}.registry').MODELS
    assert 'DynamicViT' in sparsevit_mm.REGISTERED['MODELS']
    model = registry.build(dict(type='DynamicViT', arch='deit-tiny'))
    assert type(model) is sparsevit_mm.models.DynamicViT
    assert registry.get('DynamicViT') is sparsevit_mm.models.DynamicViT  # the class itself once it is imported


@pytest.mark.parametrize('scope', ['mmengine', 'mmpretrain', 'mmdet', 'mmseg'])
def test_bare_type_builds_under_each_default_scope(scope):
    from mmengine.registry import MODELS
    with DefaultScope.overwrite_default_scope(scope):
        model = MODELS.build(dict(type='DynamicViT', arch='deit-tiny', keep_ratio=0.5))
    assert isinstance(model, sparsevit_mm.models.DynamicViT) and model.stage_ratios[0] == 0.5


def test_upstream_names_untouched():
    from mmdet.registry import MODELS as DET
    from mmpretrain.registry import MODELS as CLS
    from mmseg.registry import MODELS as SEG
    for registry in (CLS, DET, SEG):
        cls = registry.get('SwinTransformer')
        assert cls is not None and not cls.__module__.startswith('sparsevit_mm')


@pytest.mark.slow
def test_custom_imports_in_a_config(tmp_path):
    """In an interpreter that has not imported sparsevit_mm, the config's custom_imports is what registers it."""
    path = tmp_path / 'cfg.py'
    path.write_text("custom_imports = dict(imports=['sparsevit_mm'], allow_failed_imports=False)\n"
                    "model = dict(type='DynamicViT', arch='deit-tiny')\n")
    result = fresh_interpreter(f'''
import json, sys
from mmpretrain.registry import MODELS
before = MODELS.get('DynamicViT') is not None or 'sparsevit_mm' in sys.modules
from mmengine.config import Config
cfg = Config.fromfile({str(path)!r})
print(json.dumps(dict(before=before, built=type(MODELS.build(cfg.model)).__name__)))
''')
    assert result == dict(before=False, built='DynamicViT')


@pytest.mark.slow
def test_import_is_cheap_and_builds_import_only_what_they_need():
    """``import sparsevit_mm`` and ``import sparsevit_mm.layers`` import no framework model code; building
    DynamicViT imports neither mmdet's nor mmseg's models (DynamicSwinTransformer, built on mmdet's, would)."""
    result = fresh_interpreter(f'''
import json, sys
def loaded():
    return sorted(p for p in {FRAMEWORK_MODELS!r} if p in sys.modules)
import sparsevit_mm
after_package = loaded()
import sparsevit_mm.layers
after_layers = loaded()
from mmengine.registry import MODELS
MODELS.build(dict(type='DynamicViT', arch='deit-tiny'))
after_vit = loaded()
MODELS.build(dict(type='DynamicSwinTransformer', arch='tiny'))
print(json.dumps(dict(package=after_package, layers=after_layers, vit=after_vit, swin=loaded())))
''')
    assert result['package'] == [] and result['layers'] == []
    assert 'mmdet.models' not in result['vit'] and 'mmseg.models' not in result['vit']
    assert 'mmdet.models' in result['swin']


def test_get_class_names_our_classes_only():
    from sparsevit_mm.models.backbones.base import SparseBackbone
    from sparsevit_mm.registry import get_class
    assert issubclass(get_class('DynamicConvNeXt'), SparseBackbone)
    assert get_class('KeepRatioLossHook').__name__ == 'KeepRatioLossHook'
    assert get_class('SwinTransformer') is None
