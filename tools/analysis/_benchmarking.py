"""How tools/analysis measures: interleaved timing, its statistics, part timing, and dense-prediction test data.

Private to the benchmark scripts here (``import _benchmarking`` from a script in this folder); the installable
package holds models, not measurement methodology.
"""
import argparse
import contextlib
import ctypes
import ctypes.util
import random
import statistics
import time
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn


@contextlib.contextmanager
def timed_parts(parts: Dict[str, Sequence[nn.Module]], device: torch.device) -> Iterator[Dict[str, float]]:
    """While active, the seconds spent inside the modules of each part accumulate in the yielded dict (forward
    hooks; on CUDA each boundary synchronises, which serialises the stream: use it to attribute time, not to time
    the whole pass)."""
    seconds = {part: 0.0 for part in parts}
    handles = []

    def now():
        synchronize(device)
        return time.perf_counter()

    def hooks(part):
        started = []

        def before(module, args):
            started.append(now())

        def after(module, args, output):
            seconds[part] += now() - started.pop()
        return before, after

    for part, modules in parts.items():
        for module in modules:
            before, after = hooks(part)
            handles += [module.register_forward_pre_hook(before), module.register_forward_hook(after)]
    try:
        yield seconds
    finally:
        for handle in handles:
            handle.remove()


def synchronize(device: torch.device):
    """Wait for the work queued on ``device`` (a no-op on CPU), so that wall-clock times cover it."""
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


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


def side_by_side_throughput(candidates: Dict[str, Callable[[], object]], inputs: torch.Tensor, rounds: int = 5,
                            iters: int = 10, warmup: int = 3, progress: bool = True,
                            grad: bool = False) -> Dict[str, List[float]]:
    """Images/s of each candidate, measured in interleaved rounds so that machine noise hits all of them alike.

    Args:
        candidates: name -> a zero-argument callable that switches the model into that setting and returns
            the function to time (called with ``inputs``).
        rounds: each round times every candidate once (``iters`` calls after ``warmup`` calls).
        grad: run with autograd on (training steps); off by default (inference).
    Returns:
        name -> images/s of every round (report the median).
    """
    from tqdm import tqdm
    results = {name: [] for name in candidates}
    bar = tqdm(total=rounds * len(candidates), desc='benchmark', disable=not progress, leave=False)
    with torch.set_grad_enabled(grad):
        _timed_rounds(candidates, inputs, rounds, iters, warmup, results, bar)
    bar.close()
    return results


def _timed_rounds(candidates, inputs, rounds, iters, warmup, results, bar):
    device = inputs.device
    for _ in range(rounds):
        for name, prepare in candidates.items():
            fn = prepare()
            for _ in range(warmup):
                fn(inputs)
            synchronize(device)
            start = time.perf_counter()
            for _ in range(iters):
                fn(inputs)
            synchronize(device)
            results[name].append(iters * inputs.shape[0] / (time.perf_counter() - start))
            bar.update()


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def round_speedups(results: Dict[str, List[float]], baseline: str) -> Dict[str, List[float]]:
    """Per-round speed-up of every candidate over ``baseline`` (both timed in the same round, so a slow spell of a
    shared machine cancels out) -> name -> one ratio per round."""
    return {name: [ours / base for ours, base in zip(values, results[baseline])] for name, values in results.items()}


def median_interval(values: Sequence[float], confidence: float = 0.95, resamples: int = 2000,
                    seed: int = 0) -> Tuple[float, float]:
    """Bootstrap percentile interval of the median of ``values``: how far the reported median could move if the
    rounds were run again on an equally noisy machine."""
    rng = random.Random(seed)
    medians = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(resamples))
    tail = (1.0 - confidence) / 2
    return medians[int(tail * (resamples - 1))], medians[int(round((1.0 - tail) * (resamples - 1)))]


def quartiles(values: Sequence[float]) -> Tuple[float, float, float]:
    """(25th percentile, median, 75th percentile) of ``values``."""
    if len(values) < 2:
        return values[0], values[0], values[0]
    low, mid, high = statistics.quantiles(values, n=4, method='inclusive')
    return low, mid, high


def keep_freed_cpu_memory() -> bool:
    """Make glibc's malloc keep freed memory in the process instead of handing it back to the system.

    By default glibc serves every block above 32 MiB (most activations of a batch-32 forward pass, or of one
    800x1333 image) with a fresh ``mmap`` and unmaps it on free, so each forward pass page-faults its activations
    in again: kernel time that costs dense and dynamic models alike (a third of a ConvNeXt-T pass on the 2-core CI
    machine) and buries the difference between them. PyTorch's CPU performance guide recommends jemalloc or tcmalloc
    for the same reason; this does it with the allocator already loaded. Returns False where it does not apply
    (no glibc).
    """
    name = ctypes.util.find_library('c')
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # glibc's <malloc.h>
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 2 ** 31 - 1))


def describe_device(args) -> str:
    if args.device.startswith('cuda'):
        return torch.cuda.get_device_name()
    allocator = 'system allocator' if args.system_allocator else 'freed memory kept'
    return f'CPU, {torch.get_num_threads()} threads, {allocator}'


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


def at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an int of at least ``minimum`` (a count of 0 would divide by zero or time nothing)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f'{text!r} is not an integer') from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f'{value} is below the smallest allowed value, {minimum}')
        return value
    return parse


def add_measurement_arguments(parser, batch_size: Optional[int] = 32):
    """The arguments every benchmark script shares: the config and weights, the batch, the device, the rounds."""
    from mmengine.config import DictAction
    parser.add_argument('config', help='config file (mmpretrain, mmdet, mmseg or configs/ of this repo)')
    parser.add_argument('--checkpoint', help='weights (random init if omitted: speed does not depend on them)')
    parser.add_argument('--batch-size', type=at_least(1), default=batch_size, help='images per batch')
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu',
                        help='cuda or cpu (default: cuda when available)')
    parser.add_argument('--fp16', action='store_true', help='autocast to float16 (CUDA)')
    parser.add_argument('--rounds', type=at_least(1), default=5,
                        help='interleaved rounds; each times every setting once (the report takes medians)')
    parser.add_argument('--iters', type=at_least(1), default=10, help='timed calls per setting in a round')
    parser.add_argument('--warmup', type=at_least(0), default=3,
                        help='untimed calls before each setting\'s timed ones in a round')
    parser.add_argument('--threads', type=at_least(1), default=None, help='torch CPU threads')
    parser.add_argument('--system-allocator', action='store_true',
                        help='CPU: leave glibc malloc as it is (freed activations go back to the system)')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override config entries, e.g. model.backbone.keep_ratio=0.5')
    return parser


def prepare_measurement(args):
    """Apply ``--threads`` and (on CPU, unless ``--system-allocator``) keep freed memory in the process."""
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.device.startswith('cuda') and not args.system_allocator:
        args.system_allocator = not keep_freed_cpu_memory()


def model_to_measure(args, expected: type, what: str):
    """Apply the measurement settings, build the config's model (with ``--checkpoint``), and refuse any model that
    is not an ``expected`` one, saying what the script times (``what``)."""
    from sparsevit_mm.apis import init_model
    prepare_measurement(args)
    model = init_model(args.config, args.checkpoint, args.device, args.cfg_options)
    if not isinstance(model, expected):
        raise SystemExit(f'{what}; {args.config} builds {type(model).__name__}')
    return model


def _pipeline_steps(cfg, loader: str, pipeline_key: str) -> list:
    return (cfg.get(loader) or {}).get('dataset', {}).get('pipeline') or cfg.get(pipeline_key) or []


def train_size(cfg, framework: Optional[str]) -> Tuple[int, int]:
    """(H, W) of a training image after the config's train pipeline: mmdet's (largest) Resize scale, (1333, 800) ->
    800 x 1333; mmseg's crop size (the data preprocessor's ``size``); mmpretrain's RandomResizedCrop scale."""
    if framework == 'mmseg':
        size = (cfg.model.get('data_preprocessor') or {}).get('size') or cfg.get('crop_size') or (512, 512)
        return int(size[0]), int(size[1])
    steps = _pipeline_steps(cfg, 'train_dataloader', 'train_pipeline')
    if framework == 'mmdet':
        scales = []
        for step in steps:
            kind = str(step.get('type', '')).split('.')[-1]
            if kind in ('Resize', 'RandomResize') and step.get('scale'):
                scales.append(step['scale'])
            elif kind == 'RandomChoiceResize':
                scales += list(step.get('scales') or [])
            elif kind == 'RandomChoice':  # the 3x recipes: a choice of pipelines, each with its resizes
                for option in step.get('transforms') or []:
                    scales += [s['scale'] for s in option if s.get('scale') and 'Resize' in str(s.get('type'))]
        scales = [s for s in scales if isinstance(s, (list, tuple)) and len(s) == 2]
        if scales:
            long_side, short_side = max(max(s) for s in scales), max(min(s) for s in scales)
            return int(short_side), int(long_side)
        return 800, 1333
    for step in steps:
        if str(step.get('type', '')).split('.')[-1] in ('RandomResizedCrop', 'RandomCrop') and step.get('scale'):
            scale = step['scale']
            return (int(scale), int(scale)) if isinstance(scale, int) else (int(scale[1]), int(scale[0]))
    return 224, 224


def train_step_data(framework: Optional[str], batch: int, height: int, width: int, num_classes: int,
                    num_instances: int = 10) -> dict:
    """A training batch as a dataloader gives it: uint8 (3, H, W) images with ground truth (mmdet: ``num_instances``
    random boxes with masks per image; mmseg: a random label map; mmpretrain: a class label)."""
    generator = torch.Generator().manual_seed(0)
    if framework == 'mmdet':
        from mmdet.testing import demo_mm_inputs
        return demo_mm_inputs(batch, [(3, height, width)] * batch, num_items=[num_instances] * batch,
                              num_classes=num_classes, with_mask=True)
    images = [torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=generator) for _ in range(batch)]
    meta = dict(img_shape=(height, width), ori_shape=(height, width), pad_shape=(height, width))
    if framework == 'mmseg':
        from mmengine.structures import PixelData
        from mmseg.structures import SegDataSample
        samples = []
        for _ in images:
            labels = torch.randint(0, num_classes, (1, height, width), generator=generator)
            samples.append(SegDataSample(metainfo=dict(meta), gt_sem_seg=PixelData(data=labels)))
        return dict(inputs=images, data_samples=samples)
    from mmpretrain.structures import DataSample
    samples = [DataSample(metainfo=dict(meta)).set_gt_label(int(torch.randint(0, num_classes, (1, ),
                                                                               generator=generator)))
               for _ in images]
    return dict(inputs=images, data_samples=samples)


def resident_memory_mib(field: str = 'VmRSS') -> float:
    """This process's resident memory (``VmRSS``) or its high-water mark (``VmHWM``) in MiB, from /proc."""
    with open('/proc/self/status') as status:
        for line in status:
            if line.startswith(field + ':'):
                return int(line.split()[1]) / 1024
    raise SystemExit(f'/proc/self/status has no {field}: the CPU memory measurement needs Linux')


def reset_memory_high_water_mark():
    """Start this process's ``VmHWM`` afresh from its current resident memory (Linux: ``clear_refs`` 5)."""
    try:
        with open('/proc/self/clear_refs', 'w') as clear_refs:
            clear_refs.write('5')
    except OSError as error:
        raise SystemExit(f'cannot reset the memory high-water mark ({error}): the CPU memory measurement needs '
                         'Linux') from None
