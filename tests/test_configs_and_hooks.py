"""Every shipped config builds; the recipe's hook freezes the backbone as documented; classifier-level init."""
import copy

import pytest
import torch
from mmengine.hooks import Hook
from mmengine.registry import DefaultScope
from mmpretrain.registry import MODELS

from sparsevit_mm.utils.config import load_config

from .helpers import REPO, TINY_ARCH, make_imagenet_folder, tiny_classifier_config
from .reference.official_vit import random_official_state_dict

CLASSIFICATION = sorted(p for p in REPO.glob('configs/*/dynamic*_in1k.py') if p.parent.name != '_base_')
DENSE = sorted(REPO.glob('configs/dynamic_*/mask-rcnn_*.py')) + sorted(REPO.glob('configs/dynamic_*/upernet_*.py'))


@pytest.mark.parametrize('path', CLASSIFICATION, ids=lambda p: p.stem)
def test_classification_config_builds_the_model_it_names(path):
    cfg = load_config(str(path))
    assert cfg.train_cfg.max_epochs in (30, 120) and cfg.default_scope == 'mmpretrain'
    with DefaultScope.overwrite_default_scope('mmpretrain'):
        model = MODELS.build(cfg.model)
    backbone = model.backbone
    assert backbone.arch_settings == backbone.arch_zoo[cfg.model.backbone.arch]
    ratio = cfg.model.backbone.keep_ratio
    step = [ratio, ratio ** 2, ratio ** 3] if type(backbone).__name__ == 'DynamicViT' else \
        [ratio, ratio - 0.2, ratio - 0.4]
    assert backbone.stage_ratios == pytest.approx(step)
    assert model.teacher is not None and model.teacher.checkpoint == cfg.pretrained
    teacher = model.teacher.model  # the dense model of the student's own arch
    assert type(teacher.backbone) is type(backbone) and teacher.backbone.keep_ratio == 1.0
    assert teacher.backbone.arch_settings == backbone.arch_settings
    assert copy.deepcopy(model).teacher is model.teacher, 'EMA copies share the frozen teacher'


@pytest.mark.parametrize('path', DENSE, ids=lambda p: p.stem)
def test_detection_and_segmentation_configs_build(path):
    from mmengine.registry import MODELS as ROOT
    cfg = load_config(str(path))
    assert any(h['type'] == 'KeepRatioLossHook' for h in cfg.custom_hooks)
    with DefaultScope.overwrite_default_scope(cfg.default_scope):
        model = ROOT.build(cfg.model)
    assert type(model.backbone).__name__ == cfg.model.backbone.type
    assert model.backbone.stage_ratios == pytest.approx([0.7, 0.5, 0.3])
    assert len(model.backbone.out_indices) == 4


class WeightRecorder(Hook):
    """Records a backbone weight and a predictor weight after initialisation and after every epoch."""

    def __init__(self):
        self.records = []

    def _record(self, runner):
        backbone = runner.model.backbone
        self.records.append((backbone.blocks[1].mlp.fc1.weight.detach().clone(),
                             backbone.score_predictors[0].in_proj.weight.detach().clone()))

    def before_train(self, runner):
        self._record(runner)

    def after_train_epoch(self, runner):
        self._record(runner)


def test_freeze_backbone_hook_keeps_the_backbone_still_then_lets_it_train(tmp_path):
    from mmengine.runner import Runner
    data = make_imagenet_folder(tmp_path / 'data', per_class=4)
    path = tmp_path / 'cfg.py'
    path.write_text(tiny_classifier_config(data, tmp_path / 'work'))
    cfg = load_config(str(path))
    cfg.train_dataloader.sampler = dict(type='DefaultSampler', shuffle=True)
    cfg.train_cfg = dict(by_epoch=True, max_epochs=2, val_interval=10)
    cfg.log_processor = dict(by_epoch=True)
    cfg.default_hooks.checkpoint = dict(type='CheckpointHook', interval=10)
    cfg.optim_wrapper.paramwise_cfg = dict(custom_keys={'backbone.score_predictors': dict(lr_mult=1.0),
                                                        'backbone': dict(lr_mult=0.1)})
    cfg.custom_hooks = [dict(type='FreezeBackboneHook', epochs=1)]
    runner = Runner.from_cfg(cfg)
    recorder = WeightRecorder()
    runner.register_hook(recorder, 'LOWEST')
    runner.train()
    (backbone_init, predictor_init), (backbone_1, predictor_1), (backbone_2, _) = recorder.records
    assert torch.equal(backbone_init, backbone_1), 'the backbone must not move during the frozen epoch'
    assert not torch.equal(predictor_init, predictor_1), 'the predictors train from the start'
    assert not torch.equal(backbone_1, backbone_2), 'the backbone trains after the frozen epochs'
    lrs = [g['lr'] for g in runner.optim_wrapper.optimizer.param_groups]
    assert min(lrs) > 0, 'learning rates are restored after each frozen step'


def test_freeze_backbone_hook_needs_separate_parameter_groups(tmp_path):
    from mmengine.runner import Runner
    data = make_imagenet_folder(tmp_path / 'data', per_class=2)
    path = tmp_path / 'cfg.py'
    path.write_text(tiny_classifier_config(data, tmp_path / 'work', max_iters=1))
    cfg = load_config(str(path))
    cfg.custom_hooks = [dict(type='FreezeBackboneHook', epochs=1)]
    with pytest.raises(ValueError, match="paramwise_cfg custom key for 'backbone'"):
        Runner.from_cfg(cfg).train()


def test_classifier_init_from_an_official_checkpoint(tmp_path):
    sd = random_official_state_dict(64, 4, mlp_ratio=2.0, num_classes=2, grid=4, predictors=False)
    sd['patch_embed.proj.weight'] = sd['patch_embed.proj.weight'][..., :8, :8].contiguous()
    torch.save({'model': sd}, tmp_path / 'deit.pth')
    with DefaultScope.overwrite_default_scope('mmpretrain'):
        model = MODELS.build(dict(
            type='DynamicViTClassifier',
            backbone=dict(type='DynamicViT', arch=TINY_ARCH, img_size=32, patch_size=8, prune_layers=[1, 2, 3]),
            head=dict(type='VisionTransformerClsHead', num_classes=2, in_channels=64),
            init_cfg=dict(type='Pretrained', checkpoint=str(tmp_path / 'deit.pth'))))
    model.init_weights()
    assert torch.equal(model.backbone.blocks[3].attn.proj.weight, sd['blocks.3.attn.proj.weight'])
    assert torch.equal(model.head.layers.head.weight, sd['head.weight'])
    assert model.backbone.score_predictors[2].in_proj.weight.abs().sum() > 0, 'predictors get their own init'


def test_keep_ratio_loss_hook_refuses_a_dense_backbone():
    from types import SimpleNamespace

    from sparsevit_mm.engine import KeepRatioLossHook
    with DefaultScope.overwrite_default_scope('mmpretrain'):
        dense = MODELS.build(dict(type='ImageClassifier', backbone=dict(type='ResNet', depth=18),
                                  head=dict(type='LinearClsHead', num_classes=2, in_channels=512)))
    with pytest.raises(TypeError, match='KeepRatioLossHook needs a model with a sparse backbone .* got ResNet'):
        KeepRatioLossHook().before_train(SimpleNamespace(model=dense))
