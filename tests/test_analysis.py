"""Measurement helpers of tools/analysis: FLOPs split by part, hook timing, the bootstrap interval."""
import statistics
import time

import pytest
import torch
import torch.nn as nn

from sparsevit_mm.analysis import (count_flops, count_flops_by_part, median_interval, rate_ceilings, sparsity_parts,
                                   timed_parts)
from sparsevit_mm.models import DynamicConvNeXt, DynamicSwinTransformer

SMALL_CONVNEXT = dict(depths=[1, 1, 4, 1], channels=[16, 32, 64, 128], prune_layers=[1, 2, 3])
SMALL_SWIN = dict(embed_dims=32, depths=[1, 1, 4, 1], num_heads=[1, 2, 4, 8], prune_layers=[1, 2, 3])


@pytest.mark.parametrize('cls, arch, channels',
                         [(DynamicConvNeXt, SMALL_CONVNEXT, 64), (DynamicSwinTransformer, SMALL_SWIN, 128)])
def test_flops_by_part_count_the_routed_mlps(cls, arch, channels):
    model = cls(arch=arch, keep_ratio=0.7).eval()
    parts = sparsity_parts(model)
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
    with timed_parts({'slow': [slow], 'fast': [fast]}, torch.device('cpu')) as seconds:
        model(torch.zeros(1))
        model(torch.zeros(1))
    assert 0.1 <= seconds['slow'] < 1.0
    assert seconds['fast'] < 0.05
    model(torch.zeros(1))  # hooks are gone after the block
    assert seconds['slow'] < 0.15


def test_median_interval_covers_the_median_and_narrows_with_less_spread():
    wide = [1.0 + 0.2 * ((i * 7919) % 13 - 6) / 6 for i in range(40)]
    narrow = [1.0 + 0.02 * ((i * 7919) % 13 - 6) / 6 for i in range(40)]
    low, high = median_interval(wide)
    assert low <= statistics.median(wide) <= high
    narrow_low, narrow_high = median_interval(narrow)
    assert narrow_high - narrow_low < (high - low) / 5
    assert median_interval(wide) == (low, high)  # seeded: the same rounds give the same interval


def test_rate_ceiling_is_the_flops_speedup_only_when_every_part_runs_at_one_rate():
    def rows(mlp_rate, rest_rate):
        flops = {'slow-path MLPs': (2.0, 0.8), 'fast paths': (0.0, 0.1), 'score predictors': (0.0, 0.1),
                 'rest of the network': (3.0, 3.0)}
        table = {name: {1.0: dict(gflops=dense, gflop_per_s=mlp_rate), 0.7: dict(gflops=sparse, gflop_per_s=0.0)}
                 for name, (dense, sparse) in flops.items()}
        table['rest of the network'][1.0]['gflop_per_s'] = rest_rate
        table['total'] = {1.0: dict(gflops=5.0), 0.7: dict(gflops=4.0)}
        return table

    assert rate_ceilings(rows(60.0, 60.0), [1.0, 0.7])[0.7] == pytest.approx(5.0 / 4.0)
    # MLP work twice as fast per FLOP as the rest: saving 1 GFLOP of it saves less time than the count promises
    dense, sparse = 2.0 / 60 + 3.0 / 30, 1.0 / 60 + 3.0 / 30
    assert rate_ceilings(rows(60.0, 30.0), [1.0, 0.7])[0.7] == pytest.approx(dense / sparse)
    assert dense / sparse < 5.0 / 4.0


def test_breakdown_of_a_model_without_routing_is_a_clear_error():
    import importlib.util
    spec = importlib.util.spec_from_file_location('benchmark_tool', 'tools/analysis/benchmark.py')
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    with pytest.raises(SystemExit, match='--breakdown times the parts routing changes .* UViTDiffusion has none'):
        benchmark.main(['configs/uvit/uvit-small-p2_8xb16-500k_cifar10-32x32.py', '--breakdown', '--batch-size', '1'])
