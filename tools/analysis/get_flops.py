#!/usr/bin/env python
"""FLOPs of a model at several keep ratios, on the inference path (tokens really gathered).

    python tools/analysis/get_flops.py configs/dynamicvit/dynamicvit-deit-small_r0.7_8xb128-30e_in1k.py \
        --keep-ratios 1.0 0.7 --shape 224

FLOPs are multiply-adds (fvcore's and the papers' convention), attention included. Classifiers are counted whole
(backbone + head); detectors and segmentors by their backbone (``--backbone-only`` forces that).
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import tools._quiet  # noqa: E402,F401  (before the frameworks: their deprecation warnings)
from sparsevit_mm.launch import one_line_errors  # noqa: E402

import torch  # noqa: E402
from mmengine.config import DictAction  # noqa: E402

from sparsevit_mm.apis import init_model  # noqa: E402
from sparsevit_mm.utils.flops import count_flops  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Count FLOPs (multiply-adds) at several keep ratios')
    parser.add_argument('config', help='config file (mmpretrain, mmdet, mmseg or configs/ of this repo)')
    parser.add_argument('--shape', type=int, nargs='+', default=[224], help='input H [W] (default 224)')
    parser.add_argument('--keep-ratios', type=float, nargs='+', default=None,
                        help='keep ratios to compare (default: 1.0 and the config\'s)')
    parser.add_argument('--backbone-only', action='store_true', help='count the backbone alone')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override config entries, e.g. model.backbone.keep_ratio=0.5')
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    height, width = (args.shape * 2)[:2]
    model = init_model(args.config, cfg_options=args.cfg_options)
    if hasattr(model, 'measure_exit_gflops'):  # an early-exit model (DVT): cost of stopping at each exit
        costs = model.measure_exit_gflops(store=False)
        print(f'{type(model).__name__} {model.arch_name}, input 224x224, '
              f'{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters')
        print(f'{"exit":>4} | {"tokens":>6} | {"GFLOPs (exits 1..k)":>19} | {"this exit":>9}')
        for k, cost in enumerate(costs):
            print(f'{k + 1:>4} | {model.grids[k]:>3}^2 | {cost:>19.3f} | {cost - (costs[k - 1] if k else 0):>9.3f}')
        return costs
    backbone = model.backbone if hasattr(model, 'backbone') else model
    if not hasattr(backbone, 'keep_ratio'):
        raise ValueError(f'{type(backbone).__name__} has no keep_ratio; this tool compares token budgets of '
                         'sparsevit-mm backbones')
    whole = not args.backbone_only and hasattr(model, 'head') and hasattr(model, 'extract_feat')
    fn = (lambda x: model(x, mode='tensor')) if whole else backbone
    ratios = args.keep_ratios or sorted({1.0, float(backbone.keep_ratio)}, reverse=True)
    images = torch.randn(1, 3, height, width)
    params = sum(p.numel() for p in (model if whole else backbone).parameters())
    what = 'model' if whole else 'backbone'
    print(f'{type(backbone).__name__} ({what}), input {height}x{width}, {params / 1e6:.2f} M parameters')
    print(f'{"keep ratio":>10} | {"GFLOPs":>8} | {"vs 1.0":>7}')
    dense = None
    rows = []
    for ratio in ratios:
        backbone.keep_ratio = ratio
        flops = count_flops(fn, images, module=model)
        dense = flops if ratio == 1.0 else dense
        rows.append((ratio, flops))
        rel = f'{flops / dense:.3f}' if dense else '-'
        print(f'{ratio:>10.3f} | {flops / 1e9:>8.2f} | {rel:>7}')
    return rows


if __name__ == '__main__':
    with one_line_errors():  # a bad value or file: its message, no traceback
        main()
