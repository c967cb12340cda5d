"""Measurement helpers of tools/analysis: FLOPs split by part, hook timing, the bootstrap interval."""
import statistics
import time

import pytest
import torch
import torch.nn as nn

from sparsevit_mm.models import DynamicConvNeXt, DynamicSwinTransformer
from sparsevit_mm.utils.flops import count_flops, count_flops_by_part

from .helpers import load_tool

benchmark = load_tool('tools/analysis/benchmark.py')
measure = load_tool('tools/analysis/_benchmarking.py')

SMALL_CONVNEXT = dict(depths=[1, 1, 4, 1], channels=[16, 32, 64, 128], prune_layers=[1, 2, 3])
SMALL_SWIN = dict(embed_dims=32, depths=[1, 1, 4, 1], num_heads=[1, 2, 4, 8], prune_layers=[1, 2, 3])


@pytest.mark.parametrize('cls, arch, channels',
                         [(DynamicConvNeXt, SMALL_CONVNEXT, 64), (DynamicSwinTransformer, SMALL_SWIN, 128)])
def test_flops_by_part_count_the_routed_mlps(cls, arch, channels):
    model = cls(arch=arch, keep_ratio=0.7).eval()
    parts = benchmark.sparsity_parts(model)
    assert sorted(parts) == ['fast paths', 'score predictors', 'slow-path MLPs']
    assert len(parts['fast paths']) == 3 and len(parts['score predictors']) == 3
    images = torch.randn(1, 3, 224, 224)
    positions = 14 * 14  # stage 3 of a 224 input; MLP ratio 4
    mlp = 2 * 4 * channels * channels  # multiply-adds of one position through Linear -> Linear
    for keep_ratio, slow_ratios in [(1.0, [1.0, 1.0, 1.0]), (0.7, [0.7, 0.5, 0.3])]:
        model.keep_ratio = keep_ratio
        flops = count_flops_by_part(model, images, model, parts)
        assert flops['total'] == count_flops(model, images)
        # LayerNorm FLOPs (Swin's norm2 is a slow-path module) come on top of the two Linear layers
        norm = 0 if cls is DynamicConvNeXt else 5 * channels
        slow_positions = sum(int(positions * r) for r in slow_ratios)
        assert flops['slow-path MLPs'] == pytest.approx(slow_positions * (mlp + norm))
        if keep_ratio == 1.0:
            assert flops['fast paths'] == flops['score predictors'] == 0
        else:
            assert flops['fast paths'] > 0 and flops['score predictors'] > 0


def test_timed_parts_attributes_time_to_the_hooked_modules():
    class Sleep(nn.Module):
        def forward(self, x):
            time.sleep(0.05)
            return x

    slow, fast = Sleep(), nn.Identity()
    model = nn.Sequential(fast, slow, nn.Identity())
    with measure.timed_parts({'slow': [slow], 'fast': [fast]}, torch.device('cpu')) as seconds:
        model(torch.zeros(1))
        model(torch.zeros(1))
    assert 0.1 <= seconds['slow'] < 1.0
    assert seconds['fast'] < 0.05
    model(torch.zeros(1))  # hooks are gone after the block
    assert seconds['slow'] < 0.15


def test_median_interval_covers_the_median_and_narrows_with_less_spread():
    wide = [1.0 + 0.2 * ((i * 7919) % 13 - 6) / 6 for i in range(40)]
    narrow = [1.0 + 0.02 * ((i * 7919) % 13 - 6) / 6 for i in range(40)]
    low, high = measure.median_interval(wide)
    assert low <= statistics.median(wide) <= high
    narrow_low, narrow_high = measure.median_interval(narrow)
    assert narrow_high - narrow_low < (high - low) / 5
    assert measure.median_interval(wide) == (low, high)  # seeded: the same rounds give the same interval


def test_rate_ceiling_is_the_flops_speedup_only_when_every_part_runs_at_one_rate():
    def rows(mlp_rate, rest_rate):
        flops = {'slow-path MLPs': (2.0, 0.8), 'fast paths': (0.0, 0.1), 'score predictors': (0.0, 0.1),
                 'rest of the network': (3.0, 3.0)}
        table = {name: {1.0: dict(gflops=dense, gflop_per_s=mlp_rate), 0.7: dict(gflops=sparse, gflop_per_s=0.0)}
                 for name, (dense, sparse) in flops.items()}
        table['rest of the network'][1.0]['gflop_per_s'] = rest_rate
        table['total'] = {1.0: dict(gflops=5.0), 0.7: dict(gflops=4.0)}
        return table

    assert benchmark.rate_ceilings(rows(60.0, 60.0), [1.0, 0.7])[0.7] == pytest.approx(5.0 / 4.0)
    # MLP work twice as fast per FLOP as the rest: saving 1 GFLOP of it saves less time than the count promises
    dense, sparse = 2.0 / 60 + 3.0 / 30, 1.0 / 60 + 3.0 / 30
    assert benchmark.rate_ceilings(rows(60.0, 30.0), [1.0, 0.7])[0.7] == pytest.approx(dense / sparse)
    assert dense / sparse < 5.0 / 4.0


def test_each_benchmark_refuses_models_it_does_not_time():
    """Dispatch is by class: benchmark.py varies a sparse backbone's keep ratio and names the script for the rest."""
    with pytest.raises(SystemExit, match='UViTDiffusion has no keep ratio to vary: use tools/analysis/'
                                         'benchmark_diffusion_training.py'):
        benchmark.main(['configs/uvit/uvit-small-p2_8xb16-500k_cifar10-32x32.py', '--batch-size', '1'])
    with pytest.raises(SystemExit, match='DVT has no keep ratio to vary: use tools/analysis/benchmark_early_exit.py'):
        benchmark.main(['configs/dvt/dvt-t2t-vit-12_8xb128-310e_in1k.py', '--batch-size', '1'])
    early_exit = load_tool('tools/analysis/benchmark_early_exit.py')
    with pytest.raises(SystemExit, match='times DVT\'s early exit .* builds DynamicViTClassifier'):
        early_exit.main(['configs/dynamicvit/dynamicvit-deit-small_r0.7_8xb128-30e_in1k.py', '--batch-size', '1'])


# ------------------------------------------------------------------------------------------------ training steps
@pytest.mark.parametrize('config, size', [
    ('configs/dynamicvit/mask-rcnn_dynamicvit-deit-small-r0.7_simple-fpn_1x_coco.py', (800, 1333)),
    ('configs/dynamicvit/segmenter_dynamicvit-deit-small-r0.7_mask_8xb1-160k_ade20k-512x512.py', (512, 512)),
    ('configs/dynamicvit/upernet_dynamicvit-deit-small-r0.7_mln_8xb2-160k_ade20k-512x512.py', (512, 512)),
    ('configs/dynamicvit/dynamicvit-deit-small_r0.7_8xb128-30e_in1k.py', (224, 224)),
    ('configs/dynamic_swin/mask-rcnn_dynamic-swin-t-r0.7_fpn_ms-crop-3x_coco.py', (800, 1333)),
])
def test_training_size_is_read_off_the_config(config, size):
    from sparsevit_mm.utils.config import load_config
    cfg = load_config(config)
    framework = 'mmdet' if 'rcnn' in config else 'mmseg' if 'ade20k' in config else None
    assert measure.train_size(cfg, framework) == size


def test_the_training_benchmark_reads_no_weight_file():
    cfg = dict(type='A', pretrained='x.pth', backbone=dict(type='B', init_cfg=dict(type='Pretrained', checkpoint='y')),
               neck=[dict(type='C', init_cfg=[dict(type='Normal'), dict(type='Pretrained', checkpoint='z')])],
               head=dict(type='D', init_cfg=dict(type='Normal', std=0.01)))
    stripped = benchmark.without_weight_files(cfg)
    assert stripped['pretrained'] is None and 'init_cfg' not in stripped['backbone']
    assert 'init_cfg' not in stripped['neck'][0] and stripped['head']['init_cfg'] == dict(type='Normal', std=0.01)


@pytest.mark.slow
@pytest.mark.parametrize('kind', ['detector', 'segmentor'])
def test_training_benchmark_times_and_measures_both_settings(tmp_path, kind):
    from .helpers import make_ade, make_coco, vit_detection_config, vit_segmentation_config
    if kind == 'detector':
        text = vit_detection_config(make_coco(tmp_path / 'data', num_images=1), tmp_path / 'work')
    else:
        text = vit_segmentation_config('segmenter', make_ade(tmp_path / 'data', num_images=1), tmp_path / 'work')
    config = tmp_path / 'model.py'
    config.write_text(text)
    table = benchmark.main([str(config), '--train', '--shape', '64', '96', '--rounds', '1', '--iters', '1',
                            '--warmup', '0'])
    assert sorted(table) == [0.7, 1.0]
    for row in table.values():  # the config's batch (2), a peak measured in a child process for each setting
        assert row['seconds_per_step'] > 0 and row['peak_mib'] > 0 and row['before_mib'] > 100
    assert table[1.0]['time_ratio'] == 1.0 and table[1.0]['peak_ratio'] == 1.0
