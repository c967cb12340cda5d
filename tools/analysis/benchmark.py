#!/usr/bin/env python
"""Images/s of the dense model and the dynamic model, measured side by side in one run.

    python tools/analysis/benchmark.py configs/dynamicvit/dynamicvit-deit-small_r0.7_8xb128-30e_in1k.py \
        --batch-size 32 --shape 224 --keep-ratios 1.0 0.7 [--device cuda]
    python tools/analysis/benchmark.py configs/dynamic_swin/mask-rcnn_dynamic-swin-t-r0.7_fpn_1x_coco.py \
        --batch-size 1                             # detection / segmentation: the whole test_step at the test size
    python tools/analysis/benchmark.py CONFIG --backbone-only --shape 800 1333 --breakdown   # the backbone alone
    python tools/analysis/benchmark.py configs/dvt/dvt-t2t-vit-12_8xb128-310e_in1k.py   # early exit at 2 budgets
    python tools/analysis/benchmark.py configs/uvit/uvit-small-p2_8xb16-500k_cifar10-32x32.py --batch-size 32
        # U-ViT: training steps with math / SDPA attention, with and without gradient checkpointing

Both settings are the same weights (``keep_ratio=1.0`` is exactly the dense model); they are timed in interleaved
rounds so that load on a shared machine affects both alike. Reported: images/s (median of rounds), the speed-up over
the first keep ratio (median of the per-round ratios, with their quartiles), the speed-up the FLOPs reduction alone
would give, and the share of that gain realised (``(measured - 1) / (FLOPs speed-up - 1)``) with a 95% bootstrap
interval of the median (how far it could move in a rerun as noisy as this one). ``--breakdown`` then times the parts
routing changes (slow-path MLPs, fast paths, score predictors, the rest of the network) and prints their FLOP rates:
the FLOPs speed-up assumes every multiply-add costs the same time, and this shows where that does not hold.

On CPU, freed memory stays in the process (``keep_freed_cpu_memory``; ``--system-allocator`` turns that off): glibc
otherwise page-faults every large activation in again on each pass, kernel time that hides the models' difference.
"""
import argparse
import contextlib
import os
import sys
import time
from typing import Callable, Dict, Iterator, List, Optional, Tuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402
from mmengine.config import DictAction  # noqa: E402

from sparsevit_mm.analysis import (count_flops, count_flops_by_part, keep_freed_cpu_memory, median,  # noqa: E402
                                   median_interval, quartiles, rate_ceilings, round_speedups,
                                   side_by_side_throughput, sparsity_parts, synchronize, timed_parts)
from sparsevit_mm.apis import init_model  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Dense vs dynamic throughput, side by side')
    parser.add_argument('config')
    parser.add_argument('--checkpoint', help='weights (random init if omitted: speed does not depend on them)')
    parser.add_argument('--batch-size', type=int, default=32)
    parser.add_argument('--shape', type=int, nargs='+', default=[224])
    parser.add_argument('--keep-ratios', type=float, nargs='+', default=None,
                        help='settings to compare, first one is the baseline (default: 1.0 and the config\'s)')
    parser.add_argument('--backbone-only', action='store_true')
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--fp16', action='store_true', help='autocast to float16 (CUDA)')
    parser.add_argument('--rounds', type=int, default=5)
    parser.add_argument('--iters', type=int, default=10)
    parser.add_argument('--warmup', type=int, default=3)
    parser.add_argument('--threads', type=int, default=None, help='torch CPU threads')
    parser.add_argument('--system-allocator', action='store_true',
                        help='CPU: leave glibc malloc as it is (freed activations go back to the system)')
    parser.add_argument('--breakdown', action='store_true',
                        help='also time the parts routing changes (slow-path MLPs, fast paths, score predictors, '
                             'the rest) with module hooks, with their FLOPs and FLOP rates')
    parser.add_argument('--budget-q', type=float, nargs='+', default=[0.5, 1.5],
                        help='DVT: budgets as q of the exit law (fractions ~ q, q^2, q^3)')
    parser.add_argument('--config-detections', action='store_true',
                        help='detection configs: keep the config\'s score threshold (by default it is set to 0 so '
                             'that both settings keep max_per_img boxes per image and their heads do equal work)')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction)
    return parser.parse_args(argv)


def benchmark_early_exit(model, args):
    """DVT: early exit at two budgets vs the whole cascade vs a dense model on 14x14 tokens alone.

    Thresholds for each budget are fitted on the benchmark batch itself (exit fractions proportional to q, q^2,
    q^3, as DVT's budgets), so the measured exit fractions are the budget's; random weights make no difference to
    what is timed.
    """
    from sparsevit_mm.models.backbones.dvt_exit import DVTExit
    from sparsevit_mm.models.classifiers.dvt import NO_EXIT, exit_fraction_targets, fit_thresholds
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


def step_memory_mib(step, device: str) -> float:
    """Memory of one training step: the CUDA allocator's peak above the resident weights, or on CPU (where the
    allocator keeps no peak) the bytes of activations autograd saves for the backward pass, the part gradient
    checkpointing trades for recomputation."""
    if device.startswith('cuda'):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step(None)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2 ** 20
    seen = {}

    def pack(tensor):
        seen[(tensor.untyped_storage().data_ptr(), tensor.dtype)] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        step(None)
    return sum(seen.values()) / 2 ** 20


def benchmark_diffusion_training(model, args):
    """U-ViT: training step time and peak memory with math vs SDPA (vs xformers) attention, with and without
    gradient checkpointing, side by side on one synthetic batch."""
    network = model.network
    shape = (args.batch_size, network.in_channels, network.img_size, network.img_size)
    x0 = torch.randn(shape, device=args.device)
    labels = torch.randint(0, max(1, network.num_classes - 1), (args.batch_size, ), device=args.device) \
        if network.num_classes > 0 else None
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-5)
    settings = {'math attention': ('math', False), 'sdpa': ('sdpa', False), 'sdpa + checkpointing': ('sdpa', True),
                'math + checkpointing': ('math', True)}
    if args.device.startswith('cuda'):
        try:
            import xformers  # noqa: F401
            settings['xformers'] = ('xformers', False)
        except ImportError:
            pass
    network.train()

    def step(_):
        with torch.autocast('cuda', torch.float16, enabled=args.fp16):
            t = model.schedule.sample_train_time(x0.shape[0], x0.device)
            noise = torch.randn_like(x0)
            alpha = torch.exp(model.schedule.log_alpha(t)).to(x0.dtype).view(-1, 1, 1, 1)
            sigma = model.schedule.sigma(t).to(x0.dtype).view(-1, 1, 1, 1)
            loss = (network(alpha * x0 + sigma * noise, model.schedule.network_time(t), labels).float()
                    - noise).pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def prepare(backend, checkpointing):
        def run():
            network.set_attention(backend)
            network.use_checkpoint = checkpointing
            return step
        return run

    results = side_by_side_throughput({name: prepare(*cfg) for name, cfg in settings.items()}, x0, args.rounds,
                                      args.iters, args.warmup, grad=True)
    memory = {}
    for name, cfg in settings.items():
        prepare(*cfg)()
        step(None)
        memory[name] = step_memory_mib(step, args.device)
    device = describe_device(args)
    speedups = round_speedups(results, 'math attention')
    print(f'U-ViT training step, batch {args.batch_size}, input {tuple(shape[1:])}, {device}'
          f'{", fp16" if args.fp16 else ""}, {args.rounds} interleaved rounds of {args.iters} steps')
    what = 'peak memory (MiB)' if args.device.startswith('cuda') else 'saved activations (MiB)'
    print(f'{"setting":>22} | {"steps/s":>8} | {"vs math":>7} | {what:>23}')
    table = {}
    for name in settings:
        per_second = median(results[name]) / args.batch_size
        table[name] = dict(steps_per_s=per_second, peak_mib=memory[name])
        print(f'{name:>22} | {per_second:>8.3f} | {median(speedups[name]):>6.2f}x | {memory[name]:>23.1f}')
    return table


def describe_device(args) -> str:
    if args.device.startswith('cuda'):
        return torch.cuda.get_device_name()
    allocator = 'system allocator' if args.system_allocator else 'freed memory kept'
    return f'CPU, {torch.get_num_threads()} threads, {allocator}'


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.device.startswith('cuda') and not args.system_allocator:
        args.system_allocator = not keep_freed_cpu_memory()
    height, width = (args.shape * 2)[:2]
    model = init_model(args.config, args.checkpoint, args.device, args.cfg_options)
    if args.breakdown and (hasattr(model, 'early_exit') or hasattr(model, 'schedule')):
        raise SystemExit(f'--breakdown times the parts routing changes in a token-sparse backbone (DynamicViT, '
                         f'DynamicSwinTransformer, DynamicConvNeXt); {type(model).__name__} has none')
    if hasattr(model, 'early_exit'):
        return benchmark_early_exit(model, args)
    if hasattr(model, 'network') and hasattr(model, 'schedule'):
        return benchmark_diffusion_training(model, args)
    backbone = model.backbone if hasattr(model, 'backbone') else model
    ratios = args.keep_ratios or sorted({1.0, float(backbone.keep_ratio)}, reverse=True)
    framework = dense_prediction_framework(model)
    if framework is not None and not args.backbone_only:
        if args.breakdown:
            raise SystemExit('--breakdown times a backbone\'s parts: add --backbone-only for a detection / '
                             'segmentation config (the whole-model run reports the backbone\'s share by itself)')
        if args.shape == [224]:  # not given: the config's test size
            height, width = test_size(model.cfg, framework)
        return benchmark_whole_model(model, backbone, framework, ratios, height, width, args)
    whole = not args.backbone_only and hasattr(model, 'head') and hasattr(model, 'extract_feat')
    forward = (lambda x: model(x, mode='tensor')) if whole else backbone
    images = torch.randn(args.batch_size, 3, height, width, device=args.device)

    flops = {}
    for ratio in ratios:
        backbone.keep_ratio = ratio
        flops[ratio] = count_flops(forward, images[:1], module=model)
    results = side_by_side_throughput({r: keep_ratio_setting(backbone, r, forward, args.fp16) for r in ratios}, images,
                                      args.rounds, args.iters, args.warmup)
    speedups = round_speedups(results, ratios[0])
    what = 'model' if whole else 'backbone'
    print(f'{type(backbone).__name__} ({what}), batch {args.batch_size}, {height}x{width}, {describe_device(args)}, '
          f'{args.rounds} interleaved rounds of {args.iters} batches')
    print(f'{"keep ratio":>10} | {"GFLOPs":>7} | {"images/s":>9} | {"speed-up":>8} | {"quartiles":>13} | '
          f'{"FLOPs speed-up":>14} | {"gain realised (95% CI)":>22}')
    table = speed_rows(results, speedups, flops, ratios)
    for ratio, row in table.items():
        print(row.pop('line'))
    if args.breakdown:
        table['breakdown'] = time_breakdown(model, backbone, forward, images, ratios, args)
    return table


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


def dense_prediction_framework(model) -> Optional[str]:
    """``'mmdet'`` / ``'mmseg'`` for a detector / segmentor, else None (a classifier or one of our models)."""
    for framework in ('mmdet', 'mmseg'):
        if type(model).__module__.startswith(framework + '.') and hasattr(model, 'backbone'):
            return framework
    return None


def test_size(cfg, framework: str) -> Tuple[int, int]:
    """(H, W) a test image has after the config's test pipeline: mmdet's Resize scale (1333, 800) -> 800 x 1333;
    mmseg: the data preprocessor's crop size (the ADE20K recipes' 512 x 512)."""
    if framework == 'mmseg':
        size = (cfg.model.get('data_preprocessor') or {}).get('size') or (512, 512)
        return int(size[0]), int(size[1])
    pipeline = (cfg.get('test_dataloader') or {}).get('dataset', {}).get('pipeline') or cfg.get('test_pipeline') or []
    for step in pipeline:
        if str(step.get('type', '')).split('.')[-1] == 'Resize' and step.get('scale'):
            long_side, short_side = max(step['scale']), min(step['scale'])
            return int(short_side), int(long_side)
    return 800, 1333


def test_step_data(framework: str, batch: int, height: int, width: int) -> dict:
    """A test batch as a dataloader gives it: uint8 (3, H, W) images and data samples with their metainfo."""
    if framework == 'mmdet':
        from mmdet.structures import DetDataSample as Sample
    else:
        from mmseg.structures import SegDataSample as Sample
    generator = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=generator) for _ in range(batch)]
    meta = dict(img_shape=(height, width), ori_shape=(height, width), pad_shape=(height, width),
                scale_factor=(1.0, 1.0))
    return dict(inputs=images, data_samples=[Sample(metainfo=dict(meta)) for _ in images])


def _sdpa_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    """torch's FlopCounterMode has no rule for the CPU attention kernel: both matmuls, 2 FLOPs per multiply-add."""
    batch = 1
    for size in query[:-2]:
        batch *= size
    return 2 * batch * query[-2] * key[-2] * (query[-1] + value[-1])


def count_step_flops(step: Callable[[], object]) -> float:
    """Multiply-adds of one call of ``step`` (any Python: data samples, NMS, slide inference), counted at torch's
    dispatch level (matmuls, convolutions, attention; custom ops such as RoIAlign / NMS are not counted)."""
    from torch.utils.flop_counter import FlopCounterMode
    aten = torch.ops.aten
    mapping = {aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_flops}
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        step()
    return counter.get_total_flops() / 2  # FlopCounterMode counts a multiply-add as 2 FLOPs


def whole_model_parts(model, framework: str) -> Dict[str, List[Tuple[object, str]]]:
    """The parts of a detector / segmentor's test step as (object, method) pairs to time: backbone, neck, and the
    heads' ``predict`` (mmseg's decode head calls its own ``forward`` directly, so module hooks would miss it)."""
    parts = {'backbone': [(model.backbone, 'forward')]}
    if getattr(model, 'neck', None) is not None:
        parts['neck'] = [(model.neck, 'forward')]
    names = ('decode_head', ) if framework == 'mmseg' else ('rpn_head', 'roi_head', 'bbox_head', 'mask_head',
                                                             'panoptic_head', 'panoptic_fusion_head')
    heads = [(getattr(model, name), 'predict') for name in names if getattr(model, name, None) is not None]
    if heads:
        parts['heads'] = heads
    return parts


@contextlib.contextmanager
def timed_methods(parts: Dict[str, List[Tuple[object, str]]], device) -> Iterator[Dict[str, float]]:
    """While active, the seconds spent inside the given methods accumulate per part in the yielded dict (each
    method is wrapped on its instance and restored afterwards; on CUDA each boundary synchronises)."""
    seconds = {part: 0.0 for part in parts}

    def wrap(part, method):
        def timed(*args, **kwargs):
            synchronize(device)
            start = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                synchronize(device)
                seconds[part] += time.perf_counter() - start
        return timed

    wrapped = []
    for part, targets in parts.items():
        for owner, name in targets:
            setattr(owner, name, wrap(part, getattr(owner, name)))
            wrapped.append((owner, name))
    try:
        yield seconds
    finally:
        for owner, name in wrapped:
            delattr(owner, name)  # the instance attribute goes; the class's method shows through again


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
    results = side_by_side_throughput({r: keep_ratio_setting(backbone, r, step, args.fp16) for r in ratios}, counter,
                                      args.rounds, args.iters, args.warmup)
    part_methods = whole_model_parts(model, framework)
    with torch.no_grad():
        for ratio in ratios:
            backbone.keep_ratio = ratio
            outputs = step()  # warm-up of this setting outside the timed pass
            if framework == 'mmdet':
                detections[ratio] = count_detections(outputs)
            with timed_methods(part_methods, counter.device) as inside:
                synchronize(counter.device)
                start = time.perf_counter()
                step()
                synchronize(counter.device)
                total = time.perf_counter() - start
            parts[ratio] = dict(inside, rest=total - sum(inside.values()), total=total)
    speedups = round_speedups(results, ratios[0])
    print(f'{type(model).__name__} with {type(backbone).__name__} (whole model: test_step), batch {args.batch_size}, '
          f'{height}x{width}, {describe_device(args)}, {args.rounds} interleaved rounds of {args.iters} batches')
    if changed:
        print(f'Equal head work in both settings: {changed}; --config-detections keeps the config\'s threshold')
    print(f'{"keep ratio":>10} | {"GFLOPs":>7} | {"images/s":>9} | {"speed-up":>8} | {"quartiles":>13} | '
          f'{"FLOPs speed-up":>14} | {"gain realised (95% CI)":>22}')
    table = speed_rows(results, speedups, flops, ratios)
    for ratio, row in table.items():
        print(row.pop('line'))
        row['seconds_by_part'] = parts[ratio]
        row['backbone_share'] = parts[ratio]['backbone'] / parts[ratio]['total']
        if detections:
            row['detections'] = detections[ratio]
    print(f'\nWhere the time goes (one timed test step per setting; rest: data preprocessing, post-processing, glue):')
    print(f'{"part":>10} | ' + ' | '.join(f'{f"keep {r:.2f}: ms":>15} {"share":>5}' for r in ratios))
    for name in parts[ratios[0]]:
        cells = [f'{parts[r][name] * 1000:>15.1f} {parts[r][name] / parts[r]["total"]:>5.0%}' for r in ratios]
        print(f'{"test step" if name == "total" else name:>10} | {" | ".join(cells)}')
    if detections:
        print('detections per image: ' + ', '.join(f'keep {r:.2f}: {detections[r]}' for r in ratios))
    print('(GFLOPs: the whole test step per batch, multiply-adds of matmuls, convolutions and attention; custom ops '
          'such as RoIAlign and NMS are not counted.)')
    return table


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


if __name__ == '__main__':
    main()
