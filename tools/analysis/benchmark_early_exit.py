#!/usr/bin/env python
"""DVT early exit, side by side in one run: the whole cascade, early exit at budgets, a dense 14x14-token model.

    python tools/analysis/benchmark_early_exit.py configs/dvt/dvt-t2t-vit-12_8xb128-310e_in1k.py [--budget-q 0.5 1.5]

Thresholds for each budget are fitted on the benchmark batch itself (exit fractions proportional to q, q^2, q^3, as
DVT's budgets); the settings are timed in interleaved rounds (see benchmark.py).
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import tools._quiet  # noqa: E402,F401  (before the frameworks: their deprecation warnings)

import torch  # noqa: E402

from _benchmarking import (add_measurement_arguments, describe_device, median, model_to_measure,  # noqa: E402
                           round_speedups, side_by_side_throughput)
from sparsevit_mm.models.backbones.dvt_exit import DVTExit  # noqa: E402
from sparsevit_mm.models.classifiers.dvt import DVT, NO_EXIT, exit_fraction_targets, fit_thresholds  # noqa: E402
from sparsevit_mm.utils.flops import count_flops  # noqa: E402
from sparsevit_mm.launch import one_line_errors  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='DVT: early exit vs the whole cascade, side by side')
    add_measurement_arguments(parser)
    parser.add_argument('--budget-q', type=float, nargs='+', default=[0.5, 1.5],
                        help='budgets as q of the exit law (fractions ~ q, q^2, q^3)')
    return parser.parse_args(argv)


def benchmark_early_exit(model, args):
    """DVT: early exit at two budgets vs the whole cascade vs a dense model on 14x14 tokens alone.

    Thresholds for each budget are fitted on the benchmark batch itself (exit fractions proportional to q, q^2,
    q^3, as DVT's budgets), so the measured exit fractions are the budget's; random weights make no difference to
    what is timed.
    """
    images = torch.randn(args.batch_size, 3, 224, 224, device=args.device)
    with torch.no_grad():
        confidences = torch.stack([x.softmax(-1).amax(-1) for x in model.cascade(images)])
    dense = DVTExit(14, **model.arch).to(args.device).eval()
    dense_head = model.heads[-1]
    costs = model.measure_exit_gflops(store=False)

    def thresholds_for(q):
        return fit_thresholds(confidences.cpu(), exit_fraction_targets(q))

    settings = {'full cascade': [NO_EXIT, NO_EXIT, -NO_EXIT]}
    for q in args.budget_q:
        settings[f'early exit q={q:g}'] = thresholds_for(q)

    def prepare(thresholds):
        def run():
            model.set_thresholds(thresholds)
            return lambda x: model.early_exit(x)
        return run

    candidates = {name: prepare(t) for name, t in settings.items()}
    candidates['dense 14x14 model'] = lambda: (lambda x: dense_head(dense.forward_exit(x).features))
    results = side_by_side_throughput(candidates, images, args.rounds, args.iters, args.warmup)
    speedups = round_speedups(results, 'full cascade')
    device = describe_device(args)
    print(f'DVT {model.arch_name}, batch {args.batch_size}, 224x224, {device}, {args.rounds} interleaved rounds of '
          f'{args.iters} batches; exit costs {", ".join(f"{c:.2f}" for c in costs)} GFLOPs (cumulative)')
    print(f'{"setting":>22} | {"exit fractions":>16} | {"GFLOPs":>7} | {"images/s":>9} | {"vs cascade":>10}')
    table = {}
    for name in candidates:
        value = median(results[name])
        if name in settings:
            model.set_thresholds(settings[name])
            with torch.no_grad():
                _, exits = model.early_exit(images)
            fractions = [float((exits == k).float().mean()) for k in range(3)]
            gflops = sum(f * c for f, c in zip(fractions, costs))
            shown = ' / '.join(f'{f:.2f}' for f in fractions)
        else:
            fractions, shown = None, '-'
            gflops = count_flops(lambda x: dense_head(dense.forward_exit(x).features), images[:1],
                                 module=torch.nn.ModuleList([dense, dense_head])) / 1e9
        table[name] = dict(images_per_s=value, gflops=gflops, fractions=fractions)
        print(f'{name:>22} | {shown:>16} | {gflops:>7.2f} | {value:>9.1f} | {median(speedups[name]):>9.2f}x')
    return table


def main(argv=None):
    args = parse_args(argv)
    model = model_to_measure(args, DVT, 'benchmark_early_exit.py times DVT\'s early exit (keep-ratio models: '
                                        'tools/analysis/benchmark.py)')
    return benchmark_early_exit(model, args)


if __name__ == '__main__':
    with one_line_errors():  # a bad value or file: its message, no traceback
        main()
