"""`import sparsevit_mm` registers every model into the installed frameworks, by bare name."""
import importlib

import pytest
from mmengine.registry import DefaultScope

import sparsevit_mm


@pytest.mark.parametrize('framework', ['mmpretrain', 'mmdet', 'mmseg'])
def test_models_registered_in_every_framework(framework):
    registry = importlib.import_module(f'{framework}.registry').MODELS
    assert 'DynamicViT' in sparsevit_mm.REGISTERED[framework]
    assert registry.get('DynamicViT') is sparsevit_mm.models.DynamicViT


@pytest.mark.parametrize('scope', ['mmpretrain', 'mmdet', 'mmseg'])
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


def test_custom_imports_in_a_config(tmp_path):
    from mmengine.config import Config
    path = tmp_path / 'cfg.py'
    path.write_text("custom_imports = dict(imports=['sparsevit_mm'], allow_failed_imports=False)\n"
                    "model = dict(type='DynamicViT', arch='deit-tiny')\n")
    cfg = Config.fromfile(str(path))
    from mmpretrain.registry import MODELS
    assert type(MODELS.build(cfg.model)).__name__ == 'DynamicViT'
