"""Inputs that used to be silently wrong or to fail deep inside: DVT budgets, U-ViT sampling options, empty
batches of the dynamic backbones, and the distributed launch scripts outside an activated environment."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sparsevit_mm.models import DVT, DynamicConvNeXt, DynamicSwinTransformer, DynamicViT, UViTDiffusion

from .helpers import (REPO, TINY_ARCH, TINY_CONVNEXT, TINY_DVT, TINY_SWIN, TINY_UVIT, free_port,
                      make_imagenet_folder, save_tiny_teacher, tiny_classifier_config)


# ---------------------------------------------------------------------------------------------------- DVT budget
def _tiny_dvt(**kwargs):
    torch.manual_seed(0)
    model = DVT(arch=TINY_DVT, num_classes=5, **kwargs)
    for exit_ in model.exits:
        exit_.init_weights()
    return model.eval()


def _with_table(model):
    """The model with a fitted threshold table, as tools/analysis/dvt_thresholds.py --out writes it."""
    model.exit_gflops.copy_(torch.tensor([0.5, 1.5, 3.5]))
    model.threshold_table = torch.stack([torch.tensor([t, t, -1e8]) for t in torch.linspace(0.1, 0.9, 9)])
    model.threshold_table_gflops = torch.linspace(0.6, 3.4, 9)
    return model


def test_dvt_budget_without_a_threshold_table_is_an_error_when_predicting():
    images = torch.randn(2, 3, 224, 224)
    model = _tiny_dvt(budget=1.5)
    # No table yet: nothing to pick thresholds from. Predicting must say so instead of running the whole cascade.
    for predict in (lambda: model.predict(images), lambda: model(images, mode='predict'),
                    lambda: model.early_exit(images)):
        with pytest.raises(ValueError, match=r'budget=1\.5 GFLOPs but has no fitted threshold table') as error:
            with torch.no_grad():
                predict()
        assert 'tools/analysis/dvt_thresholds.py CONFIG CKPT --budgets 1.5 --out fitted.pth' in str(error.value)
        assert 'thresholds=[' in str(error.value)
    # A checkpoint without a table (a training one, as dvt_thresholds.py itself loads) loads fine; predicting
    # with it still is the error.
    model.load_state_dict(_tiny_dvt().state_dict())
    with pytest.raises(ValueError, match='no fitted threshold table'):
        model.predict(images)
    # The anytime mode picks exits by the thresholds too.
    anytime = _tiny_dvt(budget=1.5, test_cfg=dict(mode='anytime'))
    with pytest.raises(ValueError, match='no fitted threshold table'):
        anytime.predict(images)


def test_dvt_budget_from_the_config_applies_to_a_table_loaded_later():
    fitted = _with_table(_tiny_dvt()).state_dict()
    model = _tiny_dvt(budget=1.5)
    model.load_state_dict(fitted)
    row = int((model.threshold_table_gflops <= 1.5).nonzero().max())
    assert torch.equal(model.thresholds, model.threshold_table[row])
    samples = model.predict(torch.randn(2, 3, 224, 224))
    assert len(samples) == 2
    # A table set directly (as the fitting tool does) is used at the first prediction.
    direct = _with_table(_tiny_dvt(budget=2.0))
    direct.predict(torch.randn(1, 3, 224, 224))
    row = int((direct.threshold_table_gflops <= 2.0).nonzero().max())
    assert torch.equal(direct.thresholds, direct.threshold_table[row])
    # Explicit thresholds replace a budget not yet applied.
    explicit = _tiny_dvt(budget=1.5)
    explicit.set_thresholds([0.0, 0.0, 0.0])
    _, exits = explicit.early_exit(torch.randn(2, 3, 224, 224))
    assert exits.tolist() == [0, 0]


@pytest.mark.parametrize('kwargs,message', [
    (dict(budget=0), r'budget must be a positive number of GFLOPs per image, got 0'),
    (dict(budget=-1.0), r'budget must be a positive number of GFLOPs per image, got -1\.0'),
    (dict(budget='1.5'), r"budget must be a positive number of GFLOPs per image, got '1\.5'"),
    (dict(budget=1.5, thresholds=[0.5, 0.5, 0.0]), r'give thresholds or a budget, not both'),
    (dict(test_cfg=dict(mode='anytime', budget=1.5)), r"DVT test_cfg takes only 'mode' .*, got \['budget'\]"),
    (dict(test_cfg=dict(mode='all')), r"test_cfg mode must be 'early_exit' or 'anytime', got 'all'"),
])
def test_dvt_bad_budget_or_test_cfg_is_an_error_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DVT(arch=TINY_DVT, num_classes=5, **kwargs)


# ---------------------------------------------------------------------------------------------------- U-ViT sampling
def _tiny_uvit(**kwargs):
    network = dict(type='UViT', arch=TINY_UVIT, img_size=16, patch_size=4, num_classes=kwargs.pop('num_classes', 0))
    model = UViTDiffusion(network=network, **kwargs)
    model.network.init_weights()
    return model.eval()


def _count_network_calls(model):
    calls = []
    model.network.register_forward_pre_hook(lambda *_: calls.append(1))
    return calls


@pytest.mark.parametrize('option,value,message', [
    ('steps', 0, r'steps must be an integer >= 1 \(model evaluations of DPM-Solver\), got 0'),
    ('steps', -3, r'steps must be an integer >= 1 .*got -3'),
    ('steps', 2.5, r'steps must be an integer >= 1 .*got 2\.5'),
    ('steps', True, r'steps must be an integer >= 1 .*got True'),
    ('order', 0, r'order must be 1, 2 or 3 \(the DPM-Solver order\), got 0'),
    ('order', 4, r'order must be 1, 2 or 3 .*got 4'),
    ('order', 2.0, r'order must be 1, 2 or 3 .*got 2\.0'),
])
def test_uvit_sample_rejects_bad_steps_and_order(option, value, message):
    model = _tiny_uvit(sampler=dict(steps=2, order=1))
    calls = _count_network_calls(model)
    with pytest.raises(ValueError, match=message):
        model.sample(1, **{option: value})
    assert not calls, 'the error must come before any sampling'
    with pytest.raises(ValueError, match=f'sampler {message}'):
        _tiny_uvit(sampler={option: value})


def test_uvit_sample_none_means_the_config_default():
    model = _tiny_uvit(sampler=dict(steps=3, order=2))
    calls = _count_network_calls(model)
    images = model.sample(1, steps=None, order=None)
    assert images.shape == (1, 3, 16, 16) and len(calls) == 3
    calls.clear()
    model.sample(1, steps=2)
    assert len(calls) == 2


@pytest.mark.parametrize('sampler,message', [
    (dict(step=10), r"unknown sampler option\(s\) \['step'\]; allowed: \['data_prediction', 'guidance', "
                    r"'order', 'spacing', 'steps'\]"),
    (dict(spacing='linear'), r"sampler spacing must be one of \('logSNR', 'time_uniform'\), got 'linear'"),
    (dict(guidance='0.4'), r"sampler guidance must be a finite number .*got '0\.4'"),
    (dict(guidance=0.4), r'sampler guidance=0\.4 needs a class-conditional network'),
    (dict(data_prediction='yes'), r"sampler data_prediction must be True or False, got 'yes'"),
])
def test_uvit_bad_sampler_config_is_an_error_at_construction(sampler, message):
    with pytest.raises(ValueError, match=message):
        _tiny_uvit(sampler=sampler)


def test_uvit_sample_zero_images_conditional_like_unconditional():
    unconditional = _tiny_uvit(sampler=dict(steps=2, order=1))
    expected = unconditional.sample(0)
    assert expected.shape == (0, 3, 16, 16) and expected.dtype == torch.float32
    conditional = _tiny_uvit(num_classes=6, p_uncond=0.1, sampler=dict(steps=2, order=1))
    for kwargs in (dict(), dict(labels=[]), dict(labels=2), dict(guidance=0.4)):
        images = conditional.sample(0, **kwargs)
        assert images.shape == expected.shape and images.dtype == expected.dtype, kwargs
    with pytest.raises(ValueError, match=r'num must be an integer >= 0 \(images to sample\), got -1'):
        conditional.sample(-1)
    with pytest.raises(ValueError, match=r'labels must be integer class indices, got torch.float32'):
        conditional.sample(2, labels=[1.7, 2.0])


@pytest.mark.parametrize('num_classes', [0, 4])
def test_latent_uvit_sample_zero_images(tmp_path, num_classes):
    from sparsevit_mm.models.diffusion import SDAutoencoder
    config = dict(block_out_channels=(32, 32), down_block_types=('DownEncoderBlock2D', ) * 2,
                  up_block_types=('UpDecoderBlock2D', ) * 2, norm_num_groups=8, layers_per_block=1)
    torch.save(SDAutoencoder(None, config=config, random_init=True).model.state_dict(), tmp_path / 'vae.pth')
    model = UViTDiffusion(network=dict(type='UViT', arch=TINY_UVIT, img_size=8, patch_size=2, in_channels=4,
                                       num_classes=num_classes),
                          schedule='discrete', p_uncond=0.1 if num_classes else 0.0, sampler=dict(steps=2),
                          autoencoder=dict(checkpoint=str(tmp_path / 'vae.pth'), config=config))
    one, empty = model.sample(1), model.sample(0)
    assert empty.shape == (0, *one.shape[1:]) == (0, 3, 16, 16) and empty.dtype == one.dtype


# ---------------------------------------------------------------------------------------------------- empty batches
@pytest.mark.parametrize('out_type', DynamicViT.OUT_TYPES)
@pytest.mark.parametrize('keep_ratio', [1.0, 0.5])
@pytest.mark.parametrize('training', [False, True])
def test_dynamic_vit_empty_batch(out_type, keep_ratio, training):
    model = DynamicViT(arch=TINY_ARCH, img_size=32, patch_size=8, keep_ratio=keep_ratio, prune_layers=[1, 2, 3],
                       out_type=out_type, out_indices=(1, 3))
    model.init_weights()
    model.train(training)
    with torch.no_grad():
        one = model(torch.randn(1, 3, 32, 32))
        empty = model(torch.randn(0, 3, 32, 32))
    assert [tuple(x.shape) for x in empty] == [(0, *x.shape[1:]) for x in one]


@pytest.mark.parametrize('cls,arch', [(DynamicSwinTransformer, TINY_SWIN), (DynamicConvNeXt, TINY_CONVNEXT)])
@pytest.mark.parametrize('keep_ratio', [1.0, 0.7])
@pytest.mark.parametrize('training', [False, True])
def test_dynamic_hierarchical_empty_batch(cls, arch, keep_ratio, training):
    model = cls(arch=arch, keep_ratio=keep_ratio, prune_layers=[1], out_indices=(0, 1, 2, 3))
    model.init_weights()
    model.train(training)
    with torch.no_grad():
        one = model(torch.randn(1, 3, 64, 64))
        empty = model(torch.randn(0, 3, 64, 64))
    assert [tuple(x.shape) for x in empty] == [(0, *x.shape[1:]) for x in one]


# ---------------------------------------------------------------------------------------------------- launch scripts
def test_dist_test_script_finds_the_project_environment_without_it_on_path(tmp_path):
    data = make_imagenet_folder(tmp_path / 'data', num_classes=2, per_class=2)
    config = tmp_path / 'tiny.py'
    config.write_text(tiny_classifier_config(data, tmp_path / 'work'))
    checkpoint = save_tiny_teacher(tmp_path / 'tiny.pth')
    env = {k: v for k, v in os.environ.items() if k not in ('VIRTUAL_ENV', 'PYTHONPATH', 'PYTHONHOME')}
    # A PATH with no environment on it (a python3 without torch at most), as in a shell that never activated one.
    env.update(PATH='/usr/bin:/bin', OMP_NUM_THREADS='1', PORT=str(free_port()))
    if Path(sys.prefix).resolve() != (REPO / '.venv').resolve():
        env['VIRTUAL_ENV'] = sys.prefix  # these tests run in an environment of their own: name it as activation would
    proc = subprocess.run(['bash', str(REPO / 'tools' / 'dist_test.sh'), str(config), str(checkpoint), '2'],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    text = proc.stdout + proc.stderr
    assert "No module named 'torch'" not in text and 'python: not found' not in text, text[-3000:]
    assert proc.returncode == 0, text[-4000:]
    assert 'accuracy/top1' in text


def test_dist_scripts_name_their_arguments():
    for script, usage in (('dist_train.sh', 'CONFIG NUM_PROCESSES'),
                          ('dist_test.sh', 'CONFIG CHECKPOINT NUM_PROCESSES')):
        proc = subprocess.run(['bash', str(REPO / 'tools' / script), 'only_a_config.py'], capture_output=True,
                              text=True, timeout=60)
        assert proc.returncode == 2 and f'usage: bash tools/{script} {usage}' in proc.stderr, proc.stderr


# ------------------------------------------------------------------------------------- values once accepted silently
@pytest.mark.parametrize('build, message', [
    (lambda: DynamicViT(arch=TINY_ARCH, img_size=32, patch_size=8, keep_ratio=True), 'keep_ratio must be a number, '
                                                                                      'got True'),
    (lambda: DynamicViT(arch=TINY_ARCH, img_size=32, patch_size=8, keep_ratio=[0.7, True, 0.3]),
     'each keep ratio must be a number, got True'),
    (lambda: DynamicViT(arch=TINY_ARCH, img_size=32, patch_size=8, prune_layers=[1.5, 2, 3]),
     r'prune_layers \[1.5, 2, 3\]: \[1.5\] are not block indices'),
    (lambda: DynamicViT(arch=dict(TINY_ARCH, num_layer=4), img_size=32, patch_size=8),
     r"unknown keys \['num_layer'\]; allowed: \['embed_dims', 'num_layers', 'num_heads', 'mlp_ratio'"),
    (lambda: DynamicSwinTransformer(arch=dict(TINY_SWIN, window=7)), r"unknown keys \['window'\]"),
    (lambda: DynamicConvNeXt(arch=dict(TINY_CONVNEXT, dims=[1])), r"unknown keys \['dims'\]"),
    (lambda: UViTDiffusion(network=dict(type='UViT', arch=dict(TINY_UVIT, heads=2))), r"unknown keys \['heads'\]"),
    (lambda: _tiny_dvt(thresholds=[float('nan'), 0.5, 0.0]), r'DVT thresholds must be numbers.*got \[nan\]'),
    (lambda: DynamicViT(arch=TINY_ARCH, img_size=32, patch_size=8, out_indices=(3, -1)),
     r'out_indices \[3, -1\] name layer / stage \[3\] more than once'),
    (lambda: DynamicSwinTransformer(arch=TINY_SWIN, out_indices=(1.0, 2)), r'1.0 is not an integer'),
    (lambda: DynamicSwinTransformer(arch=TINY_SWIN, window_size=0), r'window_size must be an integer from 1 to 32, '
                                                                    r'got 0'),
    (lambda: DynamicSwinTransformer(arch=TINY_SWIN, window_size=7.5), 'window_size .* got 7.5'),
    (lambda: DynamicSwinTransformer(arch=TINY_SWIN, window_size=100), r'got 100 \(each block holds'),
    (lambda: DynamicSwinTransformer(arch=TINY_SWIN, frozen_stages=9), 'frozen_stages must be an integer from -1 to '
                                                                       '4, got 9'),
    (lambda: DynamicConvNeXt(arch=TINY_CONVNEXT, frozen_stages=10), 'frozen_stages .* from 0 to 4, got 10'),
])
def test_values_once_accepted_silently_are_refused_by_name(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_negative_loss_weights_are_refused():
    from sparsevit_mm.models.classifiers.dynamic_vit_classifier import DynamicViTClassifier
    backbone = dict(type='DynamicViT', arch=TINY_ARCH, img_size=32, patch_size=8)
    head = dict(type='VisionTransformerClsHead', num_classes=2, in_channels=64)
    with pytest.raises(ValueError, match=r"loss weights must be >= 0.*'keep_ratio_weight': -2.0"):
        DynamicViTClassifier(backbone=backbone, head=head, keep_ratio_weight=-2.0)
