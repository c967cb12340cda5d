#!/usr/bin/env python
"""Images/s of the dense and the dynamic setting of one sparse model, measured side by side in one run.

    python tools/analysis/benchmark.py configs/dynamicvit/dynamicvit-deit-small_r0.7_8xb128-30e_in1k.py \
        --batch-size 32 --shape 224 --keep-ratios 1.0 0.7 [--device cuda]
    python tools/analysis/benchmark.py configs/dynamicvit/mask-rcnn_dynamicvit-deit-small-r0.7_simple-fpn_1x_coco.py \
        --batch-size 1                             # detection / segmentation: the whole test_step at the test size
    python tools/analysis/benchmark.py CONFIG --backbone-only --shape 800 1333 --breakdown   # the backbone alone

    python tools/analysis/benchmark.py CONFIG --compile --onnxruntime   # also compiled and exported, side by side
    python tools/analysis/benchmark.py CONFIG --fp16 --compile --cuda-graphs --batch-size 1 --json out.json   # GPU

    python tools/analysis/benchmark.py CONFIG --train                 # training steps: time and peak memory
    python tools/analysis/benchmark.py CONFIG --train --backbone-only --shape 800 1344 --batch-size 1

``--train`` times what one training iteration does (``model.train_step``: data preprocessor, forward, losses with
the keep-ratio loss as tools/train.py adds it, backward, optimizer step) at the config's training size and batch
size per GPU, dense and sparse side by side with the same weights (the learning rate is set to 0, so the steps do
not change them), and reports each setting's peak memory: on CUDA ``max_memory_allocated`` above what was allocated
before the step; on CPU the resident high-water mark above the resident memory before the step, each setting in a
fresh child process (glibc returning freed blocks of 64 KiB and more to the system, so that the mark is the step's
own peak and not memory held from before). With ``--backbone-only`` the step is the backbone's forward, a loss on
its outputs plus the keep-ratio loss, backward and an AdamW step.

For DVT's early exit see ``benchmark_early_exit.py``; for U-ViT's training step ``benchmark_diffusion_training.py``.

``--compile`` (torch.compile) and ``--onnxruntime`` (the ONNX export in ONNX Runtime, CPU) add backends to the same
interleaved rounds; each backend's speed-up is over its own dense setting (compiled sparse over compiled dense),
compilation and first runs excluded, and the share of eager's gain each keeps is printed (docs/deployment.md).

Both settings are the same weights (``keep_ratio=1.0`` is exactly the dense model); they are timed in interleaved
rounds so that load on a shared machine affects both alike. Reported: images/s (median of rounds), the speed-up over
the first keep ratio (median of the per-round ratios, with their quartiles), the speed-up the FLOPs reduction alone
would give, and the share of that gain realised (``(measured - 1) / (FLOPs speed-up - 1)``) with a 95% bootstrap
interval of the median (how far it could move in a rerun as noisy as this one). A detection / segmentation config
adds where the whole test step's time goes (backbone, neck, heads, the rest); ``--breakdown`` (backbone) times the
parts routing changes (slow-path MLPs, fast paths, score predictors, the rest of the network) and prints their FLOP
rates: the FLOPs speed-up assumes every multiply-add costs the same time, and this shows where that does not hold.

On CPU, freed memory stays in the process (``keep_freed_cpu_memory``; ``--system-allocator`` turns that off): glibc
otherwise page-faults every large activation in again on each pass, kernel time that hides the models' difference.
"""
import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from types import SimpleNamespace
from typing import Callable, Dict, List, Optional, Sequence, Tuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import tools._quiet  # noqa: E402,F401  (before the frameworks: their deprecation warnings)

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
from mmpretrain.models import ImageClassifier  # noqa: E402
from tqdm import tqdm  # noqa: E402

from _benchmarking import (add_measurement_arguments, count_step_flops, dense_prediction_framework,  # noqa: E402
                           describe_device, median, median_interval, prepare_measurement, quartiles,
                           reset_memory_high_water_mark, resident_memory_mib, round_speedups,
                           side_by_side_throughput, synchronize, test_size, test_step_data, timed_methods,
                           timed_parts, train_size, train_step_data)
from mmengine.config import ConfigDict  # noqa: E402
from mmengine.logging import MMLogger  # noqa: E402
from mmengine.optim import build_optim_wrapper  # noqa: E402
from mmengine.registry import MODELS, init_default_scope  # noqa: E402
from sparsevit_mm.apis import init_model, runner_model_config  # noqa: E402
from sparsevit_mm.engine import KeepRatioLossHook  # noqa: E402
from sparsevit_mm.layers import keep_ratio_loss  # noqa: E402
from sparsevit_mm.models.classifiers.dynamic_vit_classifier import DynamicViTClassifier  # noqa: E402
from sparsevit_mm.utils.config import load_config  # noqa: E402
from sparsevit_mm.deployment import as_list, export, export_targets, onnxruntime_session  # noqa: E402
from sparsevit_mm.models.backbones.base import SparseBackbone  # noqa: E402
from sparsevit_mm.models.backbones.dynamic_convnext import DynamicConvNeXtBlock  # noqa: E402
from sparsevit_mm.models.backbones.dynamic_swin import DynamicSwinBlock  # noqa: E402
from sparsevit_mm.models.classifiers.dvt import DVT  # noqa: E402
from sparsevit_mm.models.diffusion import UViTDiffusion  # noqa: E402
from sparsevit_mm.utils.flops import count_flops, count_flops_by_part  # noqa: E402
from sparsevit_mm.launch import one_line_errors  # noqa: E402

OTHER_BENCHMARKS = {DVT: 'benchmark_early_exit.py', UViTDiffusion: 'benchmark_diffusion_training.py'}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Dense vs dynamic throughput, side by side')
    add_measurement_arguments(parser, batch_size=None)
    parser.add_argument('--shape', type=int, nargs='+', default=None,
                        help='H [W] (default: 224 for a classifier or a backbone, the config\'s test size for a '
                             'detector / segmentor, its training size with --train)')
    parser.add_argument('--keep-ratios', type=float, nargs='+', default=None,
                        help='settings to compare, first one is the baseline (default: 1.0 and the config\'s)')
    parser.add_argument('--backbone-only', action='store_true',
                        help='time the backbone alone (a classifier\'s, detector\'s or segmentor\'s)')
    parser.add_argument('--breakdown', action='store_true',
                        help='also time the parts routing changes (slow-path MLPs, fast paths, score predictors, '
                             'the rest) with module hooks, with their FLOPs and FLOP rates')
    parser.add_argument('--compile', action='store_true',
                        help='also time both settings through torch.compile (compiled sparse over compiled dense; '
                             'compilation is excluded from the timing)')
    parser.add_argument('--compile-mode', default=None,
                        help="torch.compile mode ('default', 'reduce-overhead', 'max-autotune')")
    parser.add_argument('--cuda-graphs', action='store_true',
                        help="also time both settings through torch.compile(mode='reduce-overhead'), which replays "
                             'CUDA graphs (the kept counts are static per input size); classifiers and backbones')
    parser.add_argument('--compile-backend', default='inductor',
                        help="torch.compile backend (default inductor; 'eager' only checks that the graph captures)")
    parser.add_argument('--onnxruntime', action='store_true',
                        help='also export both settings to ONNX and time them in ONNX Runtime (CPU; needs the '
                             'deploy extra)')
    parser.add_argument('--config-detections', action='store_true',
                        help='detection configs: keep the config\'s score threshold (by default it is set to 0 so '
                             'that both settings keep max_per_img boxes per image and their heads do equal work)')
    parser.add_argument('--train', action='store_true',
                        help='time training steps (train_step: forward, losses, backward, optimizer step) at the '
                             'config\'s training size and batch size, and report each setting\'s peak memory')
    parser.add_argument('--json', default=None, metavar='PATH',
                        help='also write the results (keep ratio -> images/s, speed-ups, ...) to this JSON file')
    parser.add_argument('--memory-child', type=float, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def sparse_backbone_of(model) -> SparseBackbone:
    """The token-sparse backbone whose keep ratio the benchmark varies (the model itself, or its ``backbone``)."""
    for cls, script in OTHER_BENCHMARKS.items():
        if isinstance(model, cls):
            raise SystemExit(f'{type(model).__name__} has no keep ratio to vary: use tools/analysis/{script}')
    backbone = model if isinstance(model, SparseBackbone) else getattr(model, 'backbone', None)
    if not isinstance(backbone, SparseBackbone):
        raise SystemExit(f'benchmark.py compares keep ratios of a token-sparse backbone (DynamicViT, '
                         f'DynamicSwinTransformer, DynamicConvNeXt); {type(model).__name__} has backbone '
                         f'{type(backbone).__name__}')
    return backbone


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.cuda_graphs and not args.device.startswith('cuda'):
        raise SystemExit('--cuda-graphs records CUDA graphs: it needs --device cuda')
    table = run(args, argv)
    if args.json and table is not None:
        with open(args.json, 'w') as f:
            json.dump(dict(command=' '.join(['python', 'tools/analysis/benchmark.py', *argv]), results=table), f,
                      indent=1, default=str)
    return table


def run(args, argv):
    if args.train or args.memory_child is not None:
        return benchmark_training(args, argv)
    if args.batch_size is None:
        args.batch_size = 32
    prepare_measurement(args)
    shape_given = args.shape is not None
    height, width = ((args.shape or [224]) * 2)[:2]
    model = init_model(args.config, args.checkpoint, args.device, args.cfg_options)
    backbone = sparse_backbone_of(model)
    ratios = args.keep_ratios or sorted({1.0, float(backbone.keep_ratio)}, reverse=True)
    framework = dense_prediction_framework(model)
    if args.onnxruntime and args.fp16:
        raise SystemExit('--onnxruntime runs float32 models on the CPU; drop --fp16')
    if framework is not None and not args.backbone_only:
        if args.onnxruntime:
            raise SystemExit('--onnxruntime times the exported backbone of a detection / segmentation config (its '
                             'heads stay in mmdet / mmseg): add --backbone-only')
        if args.cuda_graphs:
            raise SystemExit('--cuda-graphs times a classifier or a backbone (a detector\'s or segmentor\'s heads '
                             'run data-dependent code): add --backbone-only')
        if args.breakdown:
            raise SystemExit('--breakdown times a backbone\'s parts: add --backbone-only for a detection / '
                             'segmentation config (the whole-model run reports its parts\' times by itself)')
        if not shape_given:
            height, width = test_size(model.cfg, framework)
        return benchmark_whole_model(model, backbone, framework, ratios, height, width, args)
    whole = not args.backbone_only and isinstance(model, ImageClassifier)
    forward = (lambda x: model(x, mode='tensor')) if whole else backbone
    images = torch.randn(args.batch_size, 3, height, width, device=args.device)

    flops = {}
    for ratio in ratios:
        backbone.keep_ratio = ratio
        flops[ratio] = count_flops(forward, images[:1], module=model)
    settings = {('eager', r): keep_ratio_setting(backbone, r, forward, args.fp16) for r in ratios}
    if args.compile:
        compiled = compiled_forward(forward, args)
        settings.update({('compiled', r): keep_ratio_setting(backbone, r, compiled, args.fp16) for r in ratios})
    if args.cuda_graphs:
        graphs = torch.compile(forward, dynamic=False, mode='reduce-overhead', fullgraph=True)
        settings.update({('cuda-graphs', r): keep_ratio_setting(backbone, r, graphs, args.fp16) for r in ratios})
    with tempfile.TemporaryDirectory() as export_dir:
        if args.onnxruntime:
            settings.update(onnxruntime_settings(model if whole else backbone, backbone, ratios, images, export_dir))
        warm_up(settings, images)
        results = side_by_side_throughput(settings, images, args.rounds, args.iters, args.warmup)
    what = 'model' if whole else 'backbone'
    print(f'{type(backbone).__name__} ({what}), batch {args.batch_size}, {height}x{width}, {describe_device(args)}, '
          f'{args.rounds} interleaved rounds of {args.iters} batches')
    tables = print_backend_tables(results, flops, ratios)
    table = tables.pop('eager')
    table.update(tables)
    if args.breakdown:
        table['breakdown'] = time_breakdown(model, backbone, forward, images, ratios, args)
    return table


BACKEND_NAMES = {'eager': 'eager PyTorch', 'compiled': 'torch.compile', 'cuda-graphs': 'CUDA graphs',
                 'onnxruntime': 'ONNX Runtime'}


def print_backend_tables(results, flops, ratios) -> Dict[str, dict]:
    """One row per (backend, keep ratio): speed-ups over the same backend's first ratio, so a compiled dynamic
    model is compared with the compiled dense one; then, per backend beyond eager, the share of eager's gain it
    keeps. Returns backend -> keep ratio -> row."""
    backends = list(dict.fromkeys(backend for backend, _ in results))
    print(f'{"backend":>13} | {"keep ratio":>10} | {"GFLOPs":>7} | {"images/s":>9} | {"speed-up":>8} | '
          f'{"quartiles":>13} | {"FLOPs speed-up":>14} | {"gain realised (95% CI)":>22}')
    tables = {}
    for backend in backends:
        ours = {ratio: results[(backend, ratio)] for ratio in ratios}
        tables[backend] = speed_rows(ours, round_speedups(ours, ratios[0]), flops, ratios)
        for row in tables[backend].values():
            print(f'{BACKEND_NAMES[backend]:>13} | {row.pop("line")}')
    for backend in backends[1:]:
        dense = median([a / b for a, b in zip(results[(backend, ratios[0])], results[('eager', ratios[0])])])
        print(f'{BACKEND_NAMES[backend]}: dense {dense:.2f}x the eager dense model\'s images/s', end='')
        for ratio in ratios[1:]:
            eager_gain = tables['eager'][ratio]['speedup'] - 1
            gain = tables[backend][ratio]['speedup'] - 1
            # a share of a gain within timing noise (eager under 2%) means nothing: then only the speed-ups print
            share = f'{gain / eager_gain:.0%} of' if abs(eager_gain) > 0.02 else 'vs'
            tables[backend][ratio]['share_of_eager_gain'] = gain / eager_gain if abs(eager_gain) > 0.02 else None
            print(f'; keep {ratio:.2f}: speed-up {1 + gain:.2f}x, {share} eager\'s {1 + eager_gain:.2f}x gain',
                  end='')
        print()
    return tables


def compiled_forward(forward: Callable, args) -> Callable:
    """``torch.compile`` of the forward pass (static shapes); every keep ratio gets its own graph (the kept counts
    are constants of it), compiled on its first call, which :func:`warm_up` makes before timing."""
    return torch.compile(forward, dynamic=False, mode=args.compile_mode, fullgraph=True,
                         backend=args.compile_backend)


def onnxruntime_settings(model, backbone, ratios, images, export_dir) -> Dict[tuple, Callable]:
    """Per keep ratio: export the network at this batch and size to ONNX, open an ONNX Runtime CPU session on as
    many threads as torch uses, and time ``session.run`` (the input is converted to numpy once, outside)."""
    if images.device.type != 'cpu':
        raise SystemExit('--onnxruntime runs ONNX Runtime\'s CPU provider: use --device cpu')
    settings = {}
    for ratio in ratios:
        backbone.keep_ratio = ratio
        target, = export_targets(model, tuple(images.shape[-2:]), images.shape[0])
        path = os.path.join(export_dir, f'keep{ratio:g}.onnx')
        export(target, path, 'onnx')
        session = onnxruntime_session(path)
        feed = {session.get_inputs()[0].name: images.numpy()}
        settings[('onnxruntime', ratio)] = (lambda s=session, f=feed: (lambda _: s.run(None, f)))
    return settings


def compiled_network_settings(model, backbone, ratios, step, args) -> Dict[tuple, Callable]:
    """Whole-model settings, eager and with ``torch.compile`` of the backbone's and the neck's forward (instance
    attributes, which every setting first removes with :func:`eager_forwards`); the rest of ``test_step`` eager."""
    modules = [m for m in (model.backbone, getattr(model, 'neck', None)) if m is not None]
    compiled = [torch.compile(m.forward, dynamic=False, mode=args.compile_mode, fullgraph=True,
                              backend=args.compile_backend) for m in modules]

    def setting(ratio, use_compiled):
        keep_ratio_prepare = keep_ratio_setting(backbone, ratio, step, args.fp16)

        def prepare():
            eager_forwards(model)
            if use_compiled:
                for module, forward in zip(modules, compiled):
                    module.forward = forward
            return keep_ratio_prepare()
        return prepare
    return {**{('eager', r): setting(r, False) for r in ratios}, **{('compiled', r): setting(r, True) for r in ratios}}


def eager_forwards(model):
    """Undo :func:`compiled_network_settings`: the classes' own ``forward`` shows through again."""
    for module in (model.backbone, getattr(model, 'neck', None)):
        if module is not None and 'forward' in vars(module):
            del module.forward


def warm_up(settings: Dict[tuple, Callable], images: torch.Tensor):
    """One untimed call of every setting (compilation, ONNX Runtime's first-run allocations)."""
    with torch.no_grad():
        for name, prepare in tqdm(settings.items(), desc='warm-up', leave=False):
            prepare()(images)


def keep_ratio_setting(backbone, ratio: float, fn: Callable, fp16: bool) -> Callable[[], Callable]:
    """What side_by_side_throughput times for one setting: switch the backbone to ``ratio``, return ``fn`` (under
    float16 autocast with ``fp16``)."""
    def prepare():
        backbone.keep_ratio = ratio
        if fp16:
            return lambda x: torch.autocast('cuda', torch.float16)(fn)(x)
        return fn
    return prepare


def speed_rows(results, speedups, flops, ratios) -> dict:
    """Per setting: images/s, speed-up over ``ratios[0]`` (median of per-round ratios, quartiles, 95% interval), the
    FLOPs speed-up, the share of its gain realised, and the printed table row (``'line'``)."""
    table = {}
    for ratio in ratios:
        value = median(results[ratio])
        low, measured, high = quartiles(speedups[ratio])
        interval = median_interval(speedups[ratio])
        allowed = flops[ratios[0]] / flops[ratio]
        realised = '-'
        if allowed > 1.01:  # below that the share of a gain within timing noise means nothing
            gain = [(s - 1) / (allowed - 1) for s in (measured, *interval)]
            realised = f'{gain[0]:.0%} ({gain[1]:.0%}-{gain[2]:.0%})'
        digits = 1 if value >= 10 else 3
        line = (f'{ratio:>10.3f} | {flops[ratio] / 1e9:>7.2f} | {value:>9.{digits}f} | {measured:>7.2f}x | '
                f'{low:>5.2f}-{high:<5.2f}x | {allowed:>13.2f}x | {realised:>22}')
        table[ratio] = dict(images_per_s=value, speedup=measured, speedup_quartiles=(low, high),
                            speedup_interval=interval, flops_speedup=allowed, gflops=flops[ratio] / 1e9, line=line)
    return table


def whole_model_parts(model, framework: str) -> Dict[str, List[Tuple[object, str]]]:
    """The parts of a detector / segmentor's test step as (object, method) pairs to time: backbone, neck, and the
    heads' ``predict`` (mmseg's decode head calls its own ``forward`` directly, so module hooks would miss it)."""
    parts = {'backbone': [(model.backbone, 'forward')]}
    if getattr(model, 'neck', None) is not None:
        parts['neck'] = [(model.neck, 'forward')]
    detector_heads = ('rpn_head', 'roi_head', 'bbox_head', 'mask_head', 'panoptic_head', 'panoptic_fusion_head')
    names = ('decode_head', ) if framework == 'mmseg' else detector_heads
    heads = [(getattr(model, name), 'predict') for name in names if getattr(model, name, None) is not None]
    if heads:
        parts['heads'] = heads
    return parts


def equal_detection_work(model) -> Optional[str]:
    """mmdet: score threshold 0, so that every image keeps ``max_per_img`` detections in both settings.

    With the config's threshold the number of boxes that pass depends on the weights' outputs, and with random
    weights it changes with the keep ratio (e.g. 5 boxes dense, 13 at keep 0.7 on the Swin-T Mask R-CNN), so the
    mask head would do different work in the two settings and the ratio would measure that. A trained detector on a
    busy image keeps up to ``max_per_img`` boxes too. Returns what was changed, for the printout.
    """
    for name in ('roi_head', 'bbox_head'):
        head = getattr(model, name, None)
        test_cfg = getattr(head, 'test_cfg', None)
        if test_cfg is not None and 'score_thr' in test_cfg:
            old = test_cfg['score_thr']
            test_cfg['score_thr'] = 0.0
            return f'{name} score_thr {old} -> 0 (every image keeps max_per_img={test_cfg.get("max_per_img")} boxes)'
    return None


def count_detections(outputs) -> str:
    return ' / '.join(str(len(sample.pred_instances)) for sample in outputs)


def benchmark_whole_model(model, backbone, framework, ratios, height, width, args) -> dict:
    """What a user runs: ``model.test_step`` (data preprocessor, backbone, neck, heads, post-processing) of the
    detector / segmentor, dense and dynamic in interleaved rounds, with both settings' whole-model GFLOPs and where
    the time goes (backbone, neck, heads, the rest: data preprocessing, post-processing and glue)."""
    data = test_step_data(framework, args.batch_size, height, width)
    counter = torch.zeros(args.batch_size, device=args.device)  # images/s is counted per element of this
    changed = None if framework != 'mmdet' or args.config_detections else equal_detection_work(model)

    def step(_=None):
        return model.test_step(data)

    flops, parts, detections = {}, {}, {}
    for ratio in ratios:
        backbone.keep_ratio = ratio
        flops[ratio] = count_step_flops(step)
    settings = {('eager', r): keep_ratio_setting(backbone, r, step, args.fp16) for r in ratios}
    if args.compile:
        settings.update(compiled_network_settings(model, backbone, ratios, step, args))
    warm_up(settings, counter)
    results = side_by_side_throughput(settings, counter, args.rounds, args.iters, args.warmup)
    eager_forwards(model)
    part_methods = whole_model_parts(model, framework)
    passes = {ratio: [] for ratio in ratios}
    with torch.no_grad():
        for ratio in ratios:
            backbone.keep_ratio = ratio
            outputs = step()  # warm-up of this setting outside the timed passes
            if framework == 'mmdet':
                detections[ratio] = count_detections(outputs)
        for _ in range(max(1, min(args.rounds, 3))):  # interleaved, as the main rounds
            for ratio in ratios:
                backbone.keep_ratio = ratio
                with timed_methods(part_methods, counter.device) as inside:
                    synchronize(counter.device)
                    start = time.perf_counter()
                    step()
                    synchronize(counter.device)
                    total = time.perf_counter() - start
                passes[ratio].append(dict(inside, rest=total - sum(inside.values()), total=total))
    for ratio in ratios:  # each part's median over the passes
        parts[ratio] = {name: median([one[name] for one in passes[ratio]]) for name in passes[ratio][0]}
    print(f'{type(model).__name__} with {type(backbone).__name__} (whole model: test_step), batch {args.batch_size}, '
          f'{height}x{width}, {describe_device(args)}, {args.rounds} interleaved rounds of {args.iters} batches')
    if changed:
        print(f'Equal head work in both settings: {changed}; --config-detections keeps the config\'s threshold')
    if args.compile:
        compiled = 'the backbone and the neck' if getattr(model, 'neck', None) is not None else 'the backbone'
        eager = 'the heads, with NMS and mask pasting' if framework == 'mmdet' else 'the heads and resizing'
        print(f'torch.compile: {compiled} ({eager} stay eager)')
    tables = print_backend_tables(results, flops, ratios)
    table = tables.pop('eager')
    table.update(tables)
    for ratio in ratios:
        row = table[ratio]
        row['seconds_by_part'] = parts[ratio]
        row['backbone_share'] = parts[ratio]['backbone'] / parts[ratio]['total']
        if detections:
            row['detections'] = detections[ratio]
    print(f'\nWhere the time goes (median of {len(passes[ratios[0]])} timed test steps per setting, interleaved; '
          'rest: data preprocessing, post-processing, glue):')
    print(f'{"part":>10} | ' + ' | '.join(f'{f"keep {r:.2f}: ms":>15} {"share":>5}' for r in ratios))
    for name in parts[ratios[0]]:
        cells = [f'{parts[r][name] * 1000:>15.1f} {parts[r][name] / parts[r]["total"]:>5.0%}' for r in ratios]
        print(f'{"test step" if name == "total" else name:>10} | {" | ".join(cells)}')
    if detections:
        print('detections per image: ' + ', '.join(f'keep {r:.2f}: {detections[r]}' for r in ratios))
    print('(GFLOPs: the whole test step per batch, multiply-adds of matmuls, convolutions and attention; custom ops '
          'such as RoIAlign and NMS are not counted.)')
    return table


def sparsity_parts(backbone: nn.Module) -> Dict[str, List[nn.Module]]:
    """The modules of a sparse backbone that routing adds or spares: the slow-path MLPs of routed blocks (what
    fast-path positions skip), the fast paths and the score predictors. Parts a backbone lacks are left out."""
    parts = {'slow-path MLPs': [], 'fast paths': [],
             'score predictors': list(getattr(backbone, 'score_predictors', None) or [])}
    routed = [block for block in backbone.modules() if isinstance(block, (DynamicSwinBlock, DynamicConvNeXtBlock))]
    for block in routed:
        if getattr(block, 'fast_path', None) is not None:  # a Swin block outside the routed ones has none
            parts['fast paths'].append(block.fast_path)
            parts['slow-path MLPs'] += [block.get_submodule(name) for name in block.slow_path_modules]
    return {part: modules for part, modules in parts.items() if modules}


def rate_ceilings(rows: Dict[str, Dict[float, dict]], ratios: Sequence[float]) -> Dict[float, float]:
    """The speed-up over ``ratios[0]`` each other setting would reach if every part kept its FLOP rate of the
    dense pass and the work routing adds (fast paths, predictors) ran as fast per FLOP as the slow-path MLPs it
    replaces: the ceiling a machine's FLOP rates put on the fast / slow design, whatever the routing code. (The
    FLOPs speed-up is this with all rates equal.)

    Args:
        rows: part -> setting -> ``dict(gflops=..., gflop_per_s=...)``, with the parts of :func:`sparsity_parts`
            (``'slow-path MLPs'`` among them), ``'rest of the network'`` and ``'total'``.
    """
    mlp_rate = rows['slow-path MLPs'][ratios[0]]['gflop_per_s']
    rest_rate = rows['rest of the network'][ratios[0]]['gflop_per_s']

    def seconds(ratio):
        routed = sum(row[ratio]['gflops'] for name, row in rows.items() if name not in ('rest of the network', 'total'))
        return rows['rest of the network'][ratio]['gflops'] / rest_rate + routed / mlp_rate

    return {ratio: seconds(ratios[0]) / seconds(ratio) for ratio in ratios[1:]}


def time_breakdown(model, backbone, forward, images, ratios, args) -> dict:
    """Time and FLOPs of the parts routing changes, per setting: the slow-path MLPs of routed blocks (what
    fast-path positions skip), the fast paths, the score predictors, and the rest of the network (the whole pass
    minus those), each timed with module hooks in ``args.rounds`` interleaved passes (median)."""
    parts = sparsity_parts(backbone)
    flops, seconds = {}, {}
    for ratio in ratios:
        backbone.keep_ratio = ratio
        flops[ratio] = count_flops_by_part(forward, images[:1], model, parts)
        flops[ratio]['rest of the network'] = flops[ratio]['total'] - sum(flops[ratio][p] for p in parts)
        seconds[ratio] = {name: [] for name in [*parts, 'rest of the network', 'total']}
    with torch.no_grad(), timed_parts(parts, images.device) as inside:
        for _ in range(args.rounds):
            for ratio in ratios:
                backbone.keep_ratio = ratio
                forward(images)  # warm-up of this setting (buffers, caches) outside the timed pass
                inside.update({part: 0.0 for part in parts})
                synchronize(images.device)
                start = time.perf_counter()
                forward(images)
                synchronize(images.device)
                total = time.perf_counter() - start
                for part in parts:
                    seconds[ratio][part].append(inside[part])
                seconds[ratio]['rest of the network'].append(total - sum(inside.values()))
                seconds[ratio]['total'].append(total)
    print(f'\nWhere the time goes (module hooks; median of {args.rounds} interleaved passes per setting; GFLOPs per '
          f'image, GFLOP/s = multiply-adds per second over the batch):')
    header = ' | '.join(f'{f"keep {r:.2f}: ms":>15} {"GFLOPs":>7} {"GFLOP/s":>8}' for r in ratios)
    print(f'{"part":>20} | {header}')
    rows, absent = {}, f'{"-":>15} {"-":>7} {"-":>8}'
    for name in seconds[ratios[0]]:
        cells, rows[name] = [], {}
        for ratio in ratios:
            ms = median(seconds[ratio][name]) * 1000
            gflops = flops[ratio][name] / 1e9
            rate = gflops * images.shape[0] / (ms / 1000) if ms > 0 else 0.0
            rows[name][ratio] = dict(ms=ms, gflops=gflops, gflop_per_s=rate)
            cells.append(f'{ms:>15.1f} {gflops:>7.3f} {rate:>8.1f}' if gflops or ms > 0.05 else absent)
        print(f'{"whole pass" if name == "total" else name:>20} | {" | ".join(cells)}')
    if 'slow-path MLPs' in parts:
        dense = {name: row[ratios[0]] for name, row in rows.items()}
        print(f'FLOP rates of the dense pass: slow-path MLPs {dense["slow-path MLPs"]["gflop_per_s"]:.1f} GFLOP/s, '
              f'rest of the network {dense["rest of the network"]["gflop_per_s"]:.1f}. At these rates, with fast '
              f'paths and predictors as fast per FLOP as the slow-path MLPs:')
        for ratio, ceiling in rate_ceilings(rows, ratios).items():
            allowed = rows['total'][ratios[0]]['gflops'] / rows['total'][ratio]['gflops']
            share = f', {(ceiling - 1) / (allowed - 1):.0%} of the FLOPs-allowed gain' if allowed > 1.0001 else ''
            print(f'  keep {ratio:.2f} would run {ceiling:.2f}x faster (FLOPs allow {allowed:.2f}x{share})')
    return rows


# ------------------------------------------------------------------------------------------------- training steps
def without_weight_files(node):
    """A model config that reads no weight file (time and memory do not depend on the weights): every ``init_cfg``
    of type ``Pretrained`` dropped and every ``pretrained`` set to None, at any depth."""
    if isinstance(node, (list, tuple)):
        return type(node)(without_weight_files(item) for item in node)
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        configs = value if isinstance(value, (list, tuple)) else [value]
        if key == 'init_cfg' and any(isinstance(c, dict) and c.get('type') == 'Pretrained' for c in configs):
            continue
        out[key] = None if key == 'pretrained' else without_weight_files(value)
    return ConfigDict(out)


def training_model(args, cfg):
    """The config's model in training mode with random weights, the keep-ratio loss added to a detector's or
    segmentor's losses as tools/train.py adds it."""
    init_default_scope(cfg.get('default_scope', 'mmpretrain'))
    model_cfg = runner_model_config(cfg)
    if isinstance(model_cfg.get('teacher'), dict):  # the distillation teacher's weights: random as well
        model_cfg.teacher = dict(model_cfg.teacher, checkpoint=None)
    model = MODELS.build(without_weight_files(model_cfg))
    model.init_weights()
    model.to(torch.device(args.device)).train()
    if not args.backbone_only and not isinstance(model, DynamicViTClassifier):  # that one adds the loss itself
        KeepRatioLossHook().before_train(SimpleNamespace(model=model))
    return model


def backbone_training_step(args, backbone, shape) -> Callable[[], None]:
    """The backbone's forward on random images, a loss on its outputs plus its keep-ratio loss, backward and an
    AdamW step (learning rate 0)."""
    optimizer = torch.optim.AdamW(backbone.parameters(), lr=0.0)
    images = torch.randn(args.batch_size, 3, *shape, device=args.device)

    def step():
        with torch.autocast('cuda', torch.float16, enabled=args.fp16):
            loss = sum(out.float().pow(2).mean() for out in as_list(backbone(images)))
            decisions = backbone.pop_keep_decisions()
            if decisions:
                loss = loss + backbone.default_keep_ratio_weight * keep_ratio_loss(
                    decisions, backbone.stage_ratios[:len(decisions)])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step


def num_classes_of(model, framework: Optional[str]) -> int:
    if framework == 'mmdet':
        head = model.roi_head.bbox_head if getattr(model, 'roi_head', None) is not None else model.bbox_head
        return head.num_classes
    return (model.decode_head if framework == 'mmseg' else model.head).num_classes


def model_training_step(args, cfg, model, framework, shape) -> Callable[[], None]:
    """``model.train_step`` on a synthetic batch at ``shape`` through the config's optimizer wrapper (``OptimWrapper``,
    or ``AmpOptimWrapper`` with ``--fp16``), learning rate 0."""
    wrapper_cfg = cfg.optim_wrapper.copy()
    for key in ('loss_scale', 'dtype'):
        wrapper_cfg.pop(key, None)
    wrapper_cfg.type = 'AmpOptimWrapper' if args.fp16 else 'OptimWrapper'
    optim_wrapper = build_optim_wrapper(model, wrapper_cfg)
    for group in optim_wrapper.optimizer.param_groups:
        group['lr'] = 0.0
    data = train_step_data(framework, args.batch_size, *shape, num_classes_of(model, framework))

    def step():
        model.train_step(data, optim_wrapper)
    return step


def training_step_memory(args, backbone, step, ratio) -> dict:
    """MiB of one training step at ``ratio`` after a warm-up step: ``peak`` above what the process held before the
    step (``before``), CUDA allocator or resident memory (see the module docstring)."""
    backbone.keep_ratio = ratio
    step()
    if args.device.startswith('cuda'):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated() / 2 ** 20
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return dict(before=before, peak=torch.cuda.max_memory_allocated() / 2 ** 20 - before)
    before = resident_memory_mib()
    reset_memory_high_water_mark()
    step()
    return dict(before=before, peak=resident_memory_mib('VmHWM') - before)


# glibc: every block of 64 KiB or more is mapped on its own and handed back when freed, and freed heap memory is
# trimmed, so the resident high-water mark of a step is that step's own peak
MEMORY_CHILD_ENV = dict(MALLOC_MMAP_THRESHOLD_='65536', MALLOC_TRIM_THRESHOLD_='65536', MALLOC_TOP_PAD_='0')


def memory_in_fresh_child(argv, ratio) -> dict:
    """:func:`training_step_memory` at ``ratio`` in a fresh interpreter running this script."""
    command = [sys.executable, os.path.abspath(__file__), *argv, '--memory-child', str(ratio)]
    proc = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **MEMORY_CHILD_ENV})
    if proc.returncode != 0:
        raise SystemExit(f'the memory measurement at keep ratio {ratio} failed ({proc.returncode}):\n'
                         f'{proc.stderr[-3000:]}')
    return json.loads(proc.stdout.strip().splitlines()[-1])


def benchmark_training(args, argv) -> dict:
    """Training steps of the dense and the sparse setting, same weights, interleaved rounds: seconds per step,
    its ratio to the dense step's (median of per-round ratios, quartiles), and peak memory per setting."""
    if args.checkpoint:
        raise SystemExit('--train times random weights (time and memory do not depend on them): drop --checkpoint')
    if args.compile or args.cuda_graphs or args.onnxruntime or args.breakdown:
        raise SystemExit('--train times eager training steps; --compile, --cuda-graphs, --onnxruntime and '
                         '--breakdown are for inference')
    cfg = load_config(args.config, args.cfg_options)
    if args.memory_child is None:
        prepare_measurement(args)
    elif args.threads:
        torch.set_num_threads(args.threads)
    logger = MMLogger.get_current_instance()
    level = logger.level
    logger.setLevel(logging.WARNING)  # not mmengine's tables of every parameter's initialisation and lr options
    try:
        model = training_model(args, cfg)
        backbone = sparse_backbone_of(model)
        framework = dense_prediction_framework(model)
        if args.batch_size is None:  # the config's batch size per GPU
            args.batch_size = int((cfg.get('train_dataloader') or {}).get('batch_size') or 1)
        shape = tuple((args.shape * 2)[:2]) if args.shape else train_size(cfg, framework)
        if args.backbone_only:  # the backbone sees the batch padded as the data preprocessor pads it
            divisor = int((cfg.model.get('data_preprocessor') or {}).get('pad_size_divisor') or 1)
            shape = tuple(-(-side // divisor) * divisor for side in shape)
        step = backbone_training_step(args, backbone, shape) if args.backbone_only else \
            model_training_step(args, cfg, model, framework, shape)
    finally:
        logger.setLevel(level)
    if args.memory_child is not None:
        print(json.dumps(training_step_memory(args, backbone, step, args.memory_child)))
        return None
    ratios = args.keep_ratios or sorted({1.0, float(backbone.keep_ratio)}, reverse=True)
    counter = torch.zeros(args.batch_size, device=args.device)

    def setting(ratio):
        def prepare():
            backbone.keep_ratio = ratio
            return lambda _: step()
        return prepare

    # memory first: on CPU this process keeps the memory its timed steps freed (keep_freed_cpu_memory), and a child
    # measuring beside it would need as much again
    if args.device.startswith('cuda'):
        memory = {ratio: training_step_memory(args, backbone, step, ratio) for ratio in ratios}
        where = 'CUDA max_memory_allocated above the memory allocated before the step'
    else:
        memory = {ratio: memory_in_fresh_child(argv, ratio) for ratio in ratios}
        where = ('resident high-water mark above the resident memory before the step, a fresh process per '
                 'setting')
    settings = {ratio: setting(ratio) for ratio in ratios}
    results = side_by_side_throughput(settings, counter, args.rounds, args.iters, args.warmup, grad=True)
    what = f'{type(backbone).__name__}' if args.backbone_only else \
        f'{type(model).__name__} with {type(backbone).__name__}'
    step_name = 'backbone forward, loss, backward, AdamW step' if args.backbone_only else 'train_step'
    height, width = shape
    print(f'{what} ({step_name}), batch {args.batch_size}, {height}x{width}, {describe_device(args)}'
          f'{", fp16" if args.fp16 else ""}, {args.rounds} interleaved rounds of {args.iters} steps '
          f'(learning rate 0: every step sees the same weights)')
    speedups = round_speedups(results, ratios[0])
    print(f'{"keep ratio":>10} | {"s / step":>8} | {"time vs dense":>13} | {"quartiles":>13} | '
          f'{"peak MiB":>9} | {"vs dense":>8} | {"MiB before":>10}')
    table = {}
    for ratio in ratios:
        seconds = args.batch_size / median(results[ratio])
        low, middle, high = quartiles([1 / s for s in speedups[ratio]])
        peak = memory[ratio]['peak']
        table[ratio] = dict(seconds_per_step=seconds, time_ratio=middle, time_ratio_quartiles=(low, high),
                            peak_mib=peak, peak_ratio=peak / memory[ratios[0]]['peak'],
                            before_mib=memory[ratio]['before'])
        print(f'{ratio:>10.3f} | {seconds:>8.2f} | {middle:>12.2f}x | {low:>5.2f}-{high:<5.2f}x | {peak:>9.0f} | '
              f'{table[ratio]["peak_ratio"]:>7.2f}x | {memory[ratio]["before"]:>10.0f}')
    print(f'(peak: {where}; before: the model, its optimizer state and the batch)')
    return table


if __name__ == '__main__':
    with one_line_errors():  # a bad value or file: its message, no traceback
        main()
