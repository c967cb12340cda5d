"""Compiled and exported sparse models: one graph at keep < 1, torch.export and ONNX files equal to eager, the DVT exits
with the early exit outside the graphs, and the export tool's checks and refusals."""
import json
import re

import pytest
import torch

from sparsevit_mm.deployment import (DVTExitStep, NotExportable, as_list, export, export_targets, load_exported,
                                     max_difference, run_early_exit)
from sparsevit_mm.models import DVT
from sparsevit_mm.models.classifiers.dvt import fit_thresholds

from .helpers import TINY_DVT, dvt_config, load_tool, run_tool, tiny_classifier_config, tiny_family

export_tool = load_tool('tools/deployment/export.py')


FAMILIES = ['dynamicvit', 'swin', 'convnext', 'uvit']  # the token-sparse ones (DVT: below)


@pytest.mark.parametrize('family', FAMILIES)
def test_compile_captures_one_graph_at_keep_below_one(family):
    """No graph break at keep 0.7, with autograd on (eval-mode fine-tuning of a compiled model) and off."""
    model, inputs = tiny_family(family)
    explanation = torch._dynamo.explain(model)(*inputs)  # autograd on
    assert explanation.graph_break_count == 0, [str(r.reason)[:300] for r in explanation.break_reasons]
    assert explanation.graph_count == 1
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend='eager')
    with torch.no_grad():
        assert max_difference(as_list(compiled(*inputs)), as_list(model(*inputs))) == 0.0


def test_inductor_compiled_dynamicvit_matches_eager():
    model, inputs = tiny_family('dynamicvit')
    torch._dynamo.reset()
    with torch.no_grad():
        compiled = torch.compile(model, fullgraph=True, dynamic=False)
        assert max_difference(as_list(compiled(*inputs)), as_list(model(*inputs))) < 1e-5


@pytest.mark.parametrize('family', FAMILIES)
@pytest.mark.parametrize('format', ['torch-export', 'onnx'])
def test_export_reloads_and_matches_eager_at_any_batch(family, format, tmp_path):
    if format == 'onnx':
        pytest.importorskip('onnxruntime', reason='the deploy extra (pip install -e ".[deploy]")')
    model, inputs = tiny_family(family)
    target, = export_targets(model, shape=inputs[0].shape[-2:], batch_size=2)
    if family == 'uvit':  # the model's own inputs (export_targets makes the same kinds)
        target.inputs = inputs
    path = str(tmp_path / f'{family}{".pt2" if format == "torch-export" else ".onnx"}')
    export(target, path, format, dynamic_batch=True)
    run = load_exported(path)
    for batch in (1, 2, 3):
        batch_inputs = tuple(torch.cat([x] * 2)[:batch] for x in inputs)
        with torch.no_grad():
            reference = as_list(model(*batch_inputs))
        assert max_difference(run(*batch_inputs), reference) < 2e-5, (family, format, batch)


def test_a_static_export_refuses_another_batch(tmp_path):
    model, inputs = tiny_family('convnext')
    target, = export_targets(model, shape=(64, 96), batch_size=2)
    export(target, str(tmp_path / 'static.pt2'), 'torch-export')
    run = load_exported(str(tmp_path / 'static.pt2'))
    assert len(run(torch.randn(2, 3, 64, 96))) == 4
    with pytest.raises(AssertionError, match=r'Guard failed: images.size\(\)\[0\] == 2'):  # the batch is fixed
        run(torch.randn(3, 3, 64, 96))


def test_kept_counts_are_part_of_the_graph(tmp_path):
    """A program exported at keep 0.7 keeps 0.7's tokens whatever the model's keep ratio is later."""
    model, inputs = tiny_family('dynamicvit')
    target, = export_targets(model, shape=(48, 64), batch_size=2)
    export(target, str(tmp_path / 'keep07.pt2'), 'torch-export')
    run = load_exported(str(tmp_path / 'keep07.pt2'))
    with torch.no_grad():
        at_07 = as_list(model(*inputs))
        model.keep_ratio = 0.5
        at_05 = as_list(model(*inputs))
    assert max_difference(run(*inputs), at_07) < 1e-5
    assert max_difference(run(*inputs), at_05) > 1e-3


def test_dvt_exits_export_and_early_exit_outside_the_graphs_matches_eager(tmp_path):
    dvt = DVT(arch=TINY_DVT, num_classes=3, drop_path_rate=0.0).eval()
    targets = export_targets(dvt, batch_size=2)
    assert [t.name for t in targets] == ['exit1', 'exit2', 'exit3']
    assert targets[1].input_names == ('images', 'previous_tokens', 'previous_relations')
    assert targets[2].output_names == ('logits', )
    runners = []
    for target in targets:
        export(target, str(tmp_path / f'{target.name}.pt2'), 'torch-export', dynamic_batch=True)
        runners.append(load_exported(str(tmp_path / f'{target.name}.pt2')))
    images = torch.randn(9, 3, 224, 224)
    with torch.no_grad():
        confidences = torch.stack([logits.softmax(-1).amax(-1) for logits in dvt.cascade(images)])
    thresholds = fit_thresholds(confidences, [1 / 3, 1 / 3, 1 / 3])
    dvt.set_thresholds(thresholds)
    reference, reference_exits = dvt.early_exit(images)
    logits, exits = run_early_exit(runners, images, thresholds)
    assert exits.bincount(minlength=3).tolist() == reference_exits.bincount(minlength=3).tolist() == [3, 3, 3]
    assert torch.equal(exits, reference_exits)
    assert max_difference([logits], [reference]) < 1e-5


def test_dvt_exit_step_is_the_cascade():
    dvt = DVT(arch=TINY_DVT, num_classes=3, drop_path_rate=0.0).eval()
    images = torch.randn(2, 3, 224, 224)
    handed_on, logits = (), []
    with torch.no_grad():
        for index in range(3):
            out = DVTExitStep(dvt, index)(images, *handed_on)
            logits.append(out[0])
            handed_on = out[1:]
        reference = dvt.cascade(images)
    assert max_difference(logits, reference) == 0.0


def test_export_targets_refuse_models_that_are_not_ours_and_wrong_sizes():
    from mmpretrain.models import ResNet
    with pytest.raises(NotExportable, match='ResNet.*mmdeploy'):
        export_targets(ResNet(depth=18), shape=(224, 224))
    with pytest.raises(ValueError, match='takes any input size: give the shape'):
        export_targets(tiny_family('swin')[0])
    with pytest.raises(ValueError, match='U-ViT was built for 16x16'):
        export_targets(tiny_family('uvit')[0], shape=(32, 32))
    with pytest.raises(ValueError, match='DVT exits are built for 224x224'):
        export_targets(DVT(arch=TINY_DVT, num_classes=3).eval(), shape=(160, 160))
    target, = export_targets(tiny_family('convnext')[0], shape=(64, 64), batch_size=1)
    with pytest.raises(ValueError, match='batch >= 2'):
        export(target, '/tmp/unused.pt2', 'torch-export', dynamic_batch=True)
    with pytest.raises(ValueError, match="format must be one of \\['onnx', 'torch-export'\\]"):
        export(target, '/tmp/unused.x', 'tflite')


@pytest.mark.slow
def test_export_tool_writes_onnx_checks_it_and_names_what_it_cannot_export(tmp_path):
    pytest.importorskip('onnxruntime', reason='the deploy extra (pip install -e ".[deploy]")')
    config = tmp_path / 'tiny.py'
    config.write_text(tiny_classifier_config(tmp_path / 'data', tmp_path / 'work'))
    out = run_tool('tools/deployment/export.py', config, '--format', 'onnx', '--keep-ratio', '0.5',
                   '--dynamic-batch', '--out-dir', tmp_path / 'deploy')
    assert (tmp_path / 'deploy' / 'tiny_keep0.5_32x32_classifier.onnx').exists()
    assert 'positions kept (or on the slow path) per pruning stage 8, 4, 2 of 16' in out.stdout
    rows = re.findall(r'^\s*classifier \|\s+(\w+), batch (\d) \|\s+([\d.e+-]+) \|\s+[\d.e+-]+ \| (\w+)$', out.stdout,
                      re.M)
    assert {(kind, batch) for kind, batch, _, _ in rows} == {(k, b) for k in ('noise', 'image') for b in '123'}
    assert all(ok == 'yes' and float(diff) < 1e-4 for _, _, diff, ok in rows)
    # a check that fails exits non-zero and says so
    with pytest.raises(AssertionError, match='exceed atol'):
        run_tool('tools/deployment/export.py', config, '--format', 'torch-export', '--atol', '-1', '--rtol', '0',
                 '--out-dir', tmp_path / 'deploy')


def test_export_tool_refuses_what_it_cannot_export(tmp_path):
    with pytest.raises(SystemExit, match='ResNet.*is not one of ours'):
        export_tool.main(['mmpretrain::resnet/resnet18_8xb32_in1k.py', '--format', 'torch-export',
                          '--out-dir', str(tmp_path)])
    with pytest.raises(SystemExit, match='--keep-ratio: UViTDiffusion has no keep ratio'):
        export_tool.main(['configs/uvit/uvit-small-p2_8xb16-500k_cifar10-32x32.py', '--format', 'torch-export',
                          '--keep-ratio', '0.5', '--out-dir', str(tmp_path)])
    with pytest.raises(SystemExit, match='takes any input size'):
        export_tool.main(['configs/dynamic_swin/mask-rcnn_dynamic-swin-t-r0.7_fpn_1x_coco.py', '--format',
                          'torch-export', '--out-dir', str(tmp_path)])
    with pytest.raises(SystemExit, match='--keep-ratio must be in \\(0, 1\\], got 1.5'):
        export_tool.main(['configs/dynamic_swin/dynamic-swin-t_r0.7_8xb128x4-120e_in1k.py', '--format',
                          'torch-export', '--keep-ratio', '1.5', '--out-dir', str(tmp_path)])


@pytest.mark.parametrize('family', ['swin', 'dvt'])
def test_exporting_leaves_the_eager_model_computing_real_tensors(family, tmp_path):
    """Layouts and matrices cached per size must not keep the fake tensors of an export's trace: an eager call
    after exporting at a size never seen before still computes (it once returned FakeTensors, 4x 'faster')."""
    from sparsevit_mm.models.backbones import dvt_exit, dynamic_swin
    for cached in (dynamic_swin.window_order, dynamic_swin.shift_mask, dvt_exit._resampling_matrix):
        cached.cache_clear()
    if family == 'swin':
        model, inputs = tiny_family('swin')
        target, = export_targets(model, shape=(64, 96), batch_size=2)  # (runs the model once: caches filled)
        dynamic_swin.window_order.cache_clear(), dynamic_swin.shift_mask.cache_clear()
        export(target, str(tmp_path / 'model.pt2'), 'torch-export')
        eager = lambda: as_list(model(*inputs))  # noqa: E731
    else:
        dvt = DVT(arch=TINY_DVT, num_classes=3, drop_path_rate=0.0).eval()
        step, images = DVTExitStep(dvt, 1).eval(), torch.randn(2, 3, 224, 224)
        with torch.no_grad():
            handed_on = DVTExitStep(dvt, 0)(images)[1:]
        dvt_exit._resampling_matrix.cache_clear()
        torch.export.export(step, (images, *handed_on))
        eager = lambda: as_list(step(images, *handed_on))  # noqa: E731
    with torch.no_grad():
        after_export = eager()
    assert all(type(t) is torch.Tensor for t in after_export), [type(t).__name__ for t in after_export]
    for cached in (dynamic_swin.window_order, dynamic_swin.shift_mask, dvt_exit._resampling_matrix):
        cached.cache_clear()
    with torch.no_grad():
        assert max_difference(after_export, eager()) == 0.0


def test_benchmark_times_compiled_and_onnxruntime_settings_beside_eager(tmp_path):
    pytest.importorskip('onnxruntime', reason='the deploy extra (pip install -e ".[deploy]")')
    benchmark = load_tool('tools/analysis/benchmark.py')
    config = tmp_path / 'tiny.py'
    config.write_text(tiny_classifier_config(tmp_path / 'data', tmp_path / 'work'))
    table = benchmark.main([str(config), '--shape', '32', '--batch-size', '2', '--rounds', '2', '--iters', '1',
                            '--warmup', '0', '--compile', '--compile-backend', 'eager', '--onnxruntime',
                            '--system-allocator'])
    for backend in ('compiled', 'onnxruntime'):
        assert sorted(table[backend]) == [0.7, 1.0]
        assert table[backend][1.0]['speedup'] == 1.0 and table[backend][0.7]['images_per_s'] > 0
        assert table[backend][0.7]['share_of_eager_gain'] is None or \
            table[backend][0.7]['share_of_eager_gain'] == pytest.approx(
                (table[backend][0.7]['speedup'] - 1) / (table[0.7]['speedup'] - 1))
    with pytest.raises(SystemExit, match='--onnxruntime times the exported backbone.*--backbone-only'):
        benchmark.main(['configs/dynamic_swin/mask-rcnn_dynamic-swin-t-r0.7_fpn_1x_coco.py', '--onnxruntime',
                        '--rounds', '1'])


def test_export_tool_writes_dvt_exits_and_checks_the_early_exit_over_them(tmp_path, capsys):
    config = tmp_path / 'dvt.py'
    config.write_text(dvt_config(tmp_path / 'data', tmp_path / 'work'))
    files = export_tool.main([str(config), '--format', 'torch-export', '--out-dir', str(tmp_path / 'deploy')])
    assert [f.rsplit('_', 1)[1] for f in files] == ['exit1.pt2', 'exit2.pt2', 'exit3.pt2']
    out = capsys.readouterr().out
    assert re.search(r'early exit over the exported exits .*exits \[2, 2, 2\] per exit, same as eager: True; .*\| yes',
                     out)
    assert len(re.findall(r'^\s*exit[123] \|.*\| yes$', out, re.M)) == 3 * 2 * 3  # exits x kinds x batch sizes
    table = json.loads((tmp_path / 'deploy' / 'dvt_224x224_exits.json').read_text())
    assert [e['inputs'] for e in table['exits']] == [['images'], ['images', 'previous_tokens', 'previous_relations'],
                                                     ['images', 'previous_tokens', 'previous_relations']]
    assert len(table['thresholds']) == 3
