"""DVT: archs, official checkpoints, threshold fitting, real early exit, tools, bad input."""
import re

import pytest
import torch
from mmengine.registry import DefaultScope

from sparsevit_mm.models import DVT
from sparsevit_mm.models.classifiers.dvt import exit_fraction_targets, fit_thresholds, official_dvt_to_ours
from sparsevit_mm.models.teacher import FrozenTeacher

from .helpers import TINY_ARCH, TINY_DVT, dvt_config, make_imagenet_folder, run_tool
from .reference.official_dvt import official_dvt_forward, official_dvt_state_dict


@pytest.mark.parametrize('arch,params,keys', [('t2t-vit-12', [6.99, 7.74, 7.73], 650),
                                              ('t2t-vit-14', [21.57, 23.16, 23.15], 740),
                                              ('deit-small', [22.88, 23.92, 23.64], 608)])
def test_arch_parameters_keys_and_shapes(arch, params, keys):
    model = DVT(arch=arch)
    counts = [(sum(p.numel() for p in e.parameters()) + sum(p.numel() for p in h.parameters())) / 1e6
              for e, h in zip(model.exits, model.heads)]
    assert counts == pytest.approx(params, abs=0.006)  # the official modules' counts
    buffers = {'thresholds', 'exit_gflops', 'threshold_table', 'threshold_table_gflops'}
    assert len([k for k in model.state_dict() if k not in buffers]) == keys
    model.eval()
    with torch.no_grad():
        logits = model(torch.randn(1, 3, 224, 224))
    assert [tuple(x.shape) for x in logits] == [(1, 1000)] * 3


@pytest.mark.parametrize('tokenizer', ['t2t', 'patch'])
def test_official_checkpoint_reproduces_every_exit(tokenizer):
    torch.manual_seed(0)
    arch = dict(embed_dims=64, depth=2, num_heads=2, mlp_ratio=2.0, qkv_bias=tokenizer == 'patch',
                tokenizer=tokenizer)
    source = DVT(arch=arch, num_classes=7)
    for exit_ in source.exits:
        exit_.init_weights()
    state = {k: v + 0.05 * torch.randn_like(v) if v.is_floating_point() and 'random_features' not in k and
             'pos_embed' not in k else v for k, v in source.state_dict().items()}
    official = official_dvt_state_dict(state)
    checkpoint = {'model_state_dict': official, 'flops': [0.4, 1.4, 3.4],
                  'dynamic_threshold': torch.rand(59, 3), 'budgeted_batch_classification': [
                      torch.linspace(0.5, 3.4, 59).tolist(), [70.0] * 59]}
    converted, inferred = official_dvt_to_ours(checkpoint)
    assert inferred == arch
    model = DVT(arch=inferred, num_classes=7)
    model.load_state_dict(converted)
    model.eval()
    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        ours = model(images)
    expected = official_dvt_forward(official, images, depth=2, heads=2, t2t=tokenizer == 't2t')
    for k in range(3):
        assert torch.allclose(ours[k], expected[k], atol=1e-4), (k, (ours[k] - expected[k]).abs().max())
    assert model.exit_gflops.tolist() == pytest.approx([0.4, 1.4, 3.4])
    model.set_budget(2.0)
    row = int((model.threshold_table_gflops <= 2.0).nonzero().max())
    assert torch.equal(model.thresholds, model.threshold_table[row])


def test_fit_thresholds_gives_the_requested_fractions():
    torch.manual_seed(0)
    confidences = torch.rand(3, 10000)
    for q in (0.3, 1.0, 2.5):
        fractions = exit_fraction_targets(q)
        thresholds = fit_thresholds(confidences, fractions)
        passes = confidences >= torch.tensor(thresholds)[:, None]
        passes[-1] = True
        exit_of = passes.float().argmax(0)
        measured = [(exit_of == k).float().mean().item() for k in range(3)]
        assert measured == pytest.approx(fractions, abs=2e-3)
    assert fit_thresholds(confidences, [0.0, 0.0, 1.0])[:2] == [1e8, 1e8]


def _tiny(**kwargs):
    torch.manual_seed(0)
    model = DVT(arch=TINY_DVT, num_classes=5, **kwargs)
    for exit_ in model.exits:
        exit_.init_weights()
    for head in model.heads:
        torch.nn.init.normal_(head.weight, std=1.0)
    return model.eval()


def test_early_exit_really_skips_later_exits():
    model = _tiny()
    calls = [0, 0, 0]
    for k, exit_ in enumerate(model.exits):
        exit_.register_forward_pre_hook(lambda *_, k=k: None)
        original = exit_.forward_exit

        def counted(images, *args, k=k, original=original, **kwargs):
            calls[k] += images.shape[0]
            return original(images, *args, **kwargs)
        exit_.forward_exit = counted
    images = torch.randn(6, 3, 224, 224)
    with torch.no_grad():
        full = [x.clone() for x in model.cascade(images)]
        calls[:] = [0, 0, 0]
        model.set_thresholds([0.0, 0.0, 0.0])
        logits, exits = model.early_exit(images)
    assert calls == [6, 0, 0] and exits.tolist() == [0] * 6
    assert torch.allclose(logits, full[0], atol=1e-6)
    calls[:] = [0, 0, 0]
    model.set_thresholds([1.5, 1.5, 0.0])
    with torch.no_grad():
        logits, exits = model.early_exit(images)
    assert calls == [6, 6, 6] and exits.tolist() == [2] * 6
    assert torch.allclose(logits, full[2], atol=1e-5)
    # Mixed: exit-1 threshold at the median confidence sends half the batch on; they equal their own exit.
    confidence = full[0].softmax(-1).amax(-1)
    model.set_thresholds([float(confidence.median()) + 1e-7, 1.5, 0.0])
    calls[:] = [0, 0, 0]
    with torch.no_grad():
        logits, exits = model.early_exit(images)
    stay = int((exits > 0).sum())
    assert calls == [6, stay, stay] and 0 < stay < 6
    for i, k in enumerate(exits.tolist()):
        assert torch.allclose(logits[i], full[k][i], atol=1e-5)


def test_bad_input_raises_clear_errors():
    with pytest.raises(ValueError, match="unknown arch 't2t-vit-7'"):
        DVT(arch='t2t-vit-7')
    model = _tiny()
    with pytest.raises(ValueError, match='needs 3 thresholds'):
        model.set_thresholds([0.5, 0.5])
    model.set_thresholds(torch.tensor([0.25, 0.5, 0.0]))  # another model's thresholds, as a tensor
    assert model.thresholds.tolist() == [0.25, 0.5, 0.0]
    with pytest.raises(ValueError, match='no fitted threshold table'):
        model.set_budget(1.0)
    model.exit_gflops.copy_(torch.tensor([0.5, 1.5, 3.5]))
    model.threshold_table = torch.rand(59, 3)
    model.threshold_table_gflops = torch.linspace(0.6, 3.5, 59)
    with pytest.raises(ValueError, match=r'budget 0.300 GFLOPs is below the cost of exit 1 \(0.500'):
        model.set_budget(0.3)
    with pytest.raises(ValueError, match='224x224'):
        model(torch.randn(1, 3, 192, 192))


@pytest.fixture(scope='module')
def dvt_run(tmp_path_factory):
    root = tmp_path_factory.mktemp('dvt')
    data = make_imagenet_folder(root / 'data', num_classes=2, per_class=6)
    config = root / 'dvt.py'
    config.write_text(dvt_config(data, root / 'work'))
    out = run_tool('tools/train.py', config)
    return root, config, out.stdout + out.stderr


def test_train_logs_every_exit_loss(dvt_run):
    root, config, log = dvt_run
    for key in ('loss_exit1', 'loss_exit2', 'loss_exit3'):
        assert key in log
    assert (root / 'work' / 'iter_4.pth').is_file()


@pytest.mark.slow
def test_test_tool_reports_anytime_and_budgeted_accuracy(dvt_run):
    root, config, _ = dvt_run
    ckpt = root / 'work' / 'iter_4.pth'
    out = run_tool('tools/test.py', config, ckpt, '--cfg-options', 'model.test_cfg.mode=anytime')
    text = out.stdout + out.stderr
    for key in ('early_exit/exit1_top1', 'early_exit/exit3_top1', 'early_exit/exit3_fraction', 'accuracy/top1'):
        assert key in text, key
    out = run_tool('tools/test.py', config, ckpt, '--cfg-options', 'model.thresholds=[0.0,0.0,0.0]')
    assert re.search(r'early_exit/exit1_fraction: 1\.0', out.stdout + out.stderr)


@pytest.mark.slow
def test_threshold_tool_fits_a_table_and_test_picks_a_budget(dvt_run):
    root, config, _ = dvt_run
    fitted = root / 'fitted.pth'
    out = run_tool('tools/analysis/dvt_thresholds.py', config, root / 'work' / 'iter_4.pth', '--fit-samples', '12',
                   '--budgets', '100', '--out', fitted)
    text = out.stdout
    assert 'anytime classification' in text and re.search(r'budget 100\.000 GFLOPs -> q [\d.]+', text)
    rows = re.findall(r'^\s+([\d.]+) \|\s+([\d.]+) / ([\d.]+) / ([\d.]+) \|\s+([\d.]+) \|', text, re.M)
    assert len(rows) == 59
    state = torch.load(fitted, weights_only=False)['state_dict']
    assert state['threshold_table'].shape == (59, 3) and state['exit_gflops'][0] > 0
    budget = float(state['threshold_table_gflops'][30])
    out = run_tool('tools/test.py', config, fitted, '--cfg-options', f'model.budget={budget}')
    gflops = float(re.search(r'early_exit/gflops: ([\d.]+)', out.stdout + out.stderr).group(1))
    assert gflops <= budget * 1.5  # the test split is not the fit split; the cost stays near the budget


@pytest.mark.slow
def test_converter_cli_keeps_costs_and_thresholds(tmp_path):
    source = DVT(arch=TINY_DVT, num_classes=3)
    official = official_dvt_state_dict(source.state_dict())
    torch.save({'model_state_dict': official, 'flops': [0.1, 0.3, 0.7], 'dynamic_threshold': torch.rand(59, 3),
                'budgeted_batch_classification': [torch.linspace(0.1, 0.7, 59).tolist(), [50.0] * 59],
                'anytime_classification': [1.0, 2.0, 3.0]}, tmp_path / 'official.pth.tar')
    out = run_tool('tools/model_converters/official_to_sparsevit.py', tmp_path / 'official.pth.tar',
                   tmp_path / 'ours.pth')
    assert 'exit costs kept, threshold table kept' in out.stdout
    model = DVT(arch=TINY_DVT, num_classes=3, budget=0.5)
    model.load_state_dict(torch.load(tmp_path / 'ours.pth')['state_dict'])
    assert model.exit_gflops.tolist() == pytest.approx([0.1, 0.3, 0.7]) and float(model.thresholds.sum()) < 3


def test_an_exit_is_a_backbone():
    from mmengine.registry import DefaultScope
    from mmpretrain.registry import MODELS
    with DefaultScope.overwrite_default_scope('mmpretrain'):
        model = MODELS.build(dict(type='ImageClassifier', backbone=dict(type='DVTExit', grid=14, **TINY_DVT),
                                  head=dict(type='LinearClsHead', num_classes=4, in_channels=32)))
    model.init_weights()
    assert model(torch.randn(2, 3, 224, 224)).shape == (2, 4)


@pytest.mark.slow
def test_get_flops_reports_each_exit():
    out = run_tool('tools/analysis/get_flops.py', 'configs/dvt/dvt-t2t-vit-12_8xb128-310e_in1k.py')
    costs = [float(x) for x in re.findall(r'^\s+\d \|\s+\d+\^2 \|\s+([\d.]+) \|', out.stdout, re.M)]
    assert costs == pytest.approx([0.47, 1.45, 3.46], rel=0.03)  # torch's FLOP counter on the official modules


def test_builds_under_another_frameworks_default_scope():
    """An mmseg or mmdet run makes its own scope the default; DVT's and the teacher's mmpretrain parts still build."""
    with DefaultScope.overwrite_default_scope('mmseg'):
        model = DVT(arch=TINY_DVT, num_classes=5)
        teacher = FrozenTeacher(model=dict(type='ImageClassifier', backbone=dict(type='DynamicViT', arch=TINY_ARCH,
                                                                                 img_size=32, patch_size=8),
                                           head=dict(type='LinearClsHead', num_classes=2, in_channels=64)))
    assert type(model.data_preprocessor).__name__ == 'ClsDataPreprocessor'
    assert type(teacher.model).__name__ == 'ImageClassifier'
