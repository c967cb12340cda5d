"""The keep-ratio objective cannot go missing: under the frameworks' own Runner, with only the backbone type swapped
in an upstream config, training without KeepRatioLossHook is an error that names the fix; with the hook the loss is
logged, and the logged ``loss`` is the total that is optimised."""
import pytest
import torch
from mmengine.config import Config
from mmengine.runner import Runner

from sparsevit_mm.engine import KeepRatioLossHook
from sparsevit_mm.models import DynamicViT

from .helpers import (TINY_ARCH, make_ade, make_coco, make_imagenet_folder, tiny_classifier_config,
                      vit_detection_config, vit_segmentation_config)


def runner_config(kind, tmp_path, hooks=None) -> Config:
    """An mmdet Mask R-CNN / mmseg Segmenter / mmpretrain ImageClassifier config with a tiny DynamicViT backbone, no
    custom hooks of ours, two training iterations and no validation."""
    work = tmp_path / 'work'
    if kind == 'mmdet':
        text = vit_detection_config(make_coco(tmp_path / 'data'), work, max_iters=2)
    elif kind == 'mmseg':
        text = vit_segmentation_config('segmenter', make_ade(tmp_path / 'data'), work, max_iters=2)
    else:  # mmpretrain's plain ImageClassifier, not our DynamicViTClassifier (which adds the loss itself)
        text = tiny_classifier_config(make_imagenet_folder(tmp_path / 'data'), work, max_iters=2)
        text = text.replace("type='DynamicViTClassifier'", "type='ImageClassifier'")
    path = tmp_path / f'{kind}.py'
    path.write_text(text)
    cfg = Config.fromfile(str(path))
    assert not cfg.get('custom_hooks')
    cfg.train_cfg.val_interval = 100
    cfg.custom_hooks = hooks or []
    return cfg


@pytest.mark.slow
@pytest.mark.parametrize('kind', ['mmdet', 'mmseg', 'mmpretrain'])
def test_training_without_the_keep_ratio_loss_hook_is_an_error_naming_it(tmp_path, kind):
    runner = Runner.from_cfg(runner_config(kind, tmp_path))
    with pytest.raises(RuntimeError, match=r"never turned into the keep-ratio loss.*"
                                           r"custom_hooks = \[dict\(type='KeepRatioLossHook'\)\]"):
        runner.train()


@pytest.mark.slow
@pytest.mark.parametrize('kind', ['mmdet', 'mmseg', 'mmpretrain'])
def test_with_the_hook_the_keep_ratio_loss_is_part_of_the_logged_total(tmp_path, kind):
    runner = Runner.from_cfg(runner_config(kind, tmp_path, [dict(type='KeepRatioLossHook')]))
    runner.train()
    scalars = {key[len('train/'):]: value.current() for key, value in runner.message_hub.log_scalars.items()
               if key.startswith('train/')}
    assert scalars['loss_keep_ratio'] > 0 and 'keep_ratio_stage3' in scalars
    parts = sum(value for key, value in scalars.items() if 'loss' in key and key != 'loss')  # mmengine's rule
    assert scalars['loss'] == pytest.approx(parts, rel=1e-5), scalars
    if kind == 'mmpretrain':  # the head's own 'loss' key is renamed, so that the total is what 'loss' logs
        assert 'loss_cls' in scalars


@pytest.mark.slow
def test_weight_zero_trains_without_the_loss_on_purpose(tmp_path):
    runner = Runner.from_cfg(runner_config('mmseg', tmp_path, [dict(type='KeepRatioLossHook', weight=0.0)]))
    runner.train()
    assert runner.message_hub.get_scalar('train/loss_keep_ratio').current() == 0


def test_a_negative_weight_is_refused():
    with pytest.raises(ValueError, match='weight must be >= 0.*got -1.0'):
        KeepRatioLossHook(weight=-1.0)
    with pytest.raises(ValueError, match="weight must be >= 0.*got '2'"):  # a number, not text from a config
        KeepRatioLossHook(weight='2')


def test_only_a_learning_forward_leaves_decisions_that_must_be_consumed():
    backbone = DynamicViT(arch=TINY_ARCH, img_size=32, patch_size=8, prune_layers=[1, 2, 3]).train()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():  # no learning, nothing to consume (e.g. statistics gathered in training mode)
        backbone(images)
        backbone(images)
    backbone(images)
    assert len(backbone.pop_keep_decisions()) == 3  # consumed: the next step runs
    backbone(images)
    with pytest.raises(RuntimeError, match='KeepRatioLossHook'):
        backbone(images)
    backbone(images)  # reported once; a retry starts afresh
    backbone.eval()(images)  # inference never checks
