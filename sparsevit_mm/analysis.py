"""FLOPs and throughput measurement shared by ``tools/analysis``.

FLOPs follow fvcore's convention (one fused multiply-add = one FLOP), as the DynamicViT papers report them, and are
traced on the inference path, i.e. with the tokens really gathered. mmengine's counter has no rule for
``scaled_dot_product_attention``; we add one so the attention matmuls (what token pruning saves quadratically) are
counted, exactly as the explicit ``q @ k`` / ``attn @ v`` matmuls would be.
"""
import contextlib
import ctypes
import ctypes.util
import random
import statistics
import time
from typing import Callable, Dict, Iterator, List, Sequence, Tuple

import torch
import torch.nn as nn


def _sdpa_flop_jit(inputs, outputs) -> int:
    from mmengine.analysis.jit_handles import get_shape
    q, k, v = (get_shape(x) for x in inputs[:3])
    *batch, num_queries, head_dims = q
    num_keys, value_dims = k[-2], v[-1]
    batch_size = 1
    for size in batch:
        batch_size *= size
    return batch_size * num_queries * num_keys * (head_dims + value_dims)


class _TensorForward(nn.Module):
    """Traceable wrapper; ``module`` is registered so its weights are parameters, not constants, of the trace."""

    def __init__(self, fn: Callable, module: nn.Module):
        super().__init__()
        self.fn = fn
        self.module = module

    def forward(self, x):
        out = self.fn(x)
        return tuple(out) if isinstance(out, (list, tuple)) else out


def _flop_analyzer(fn: Callable, inputs: torch.Tensor, module: nn.Module = None):
    from mmengine.analysis import FlopAnalyzer
    target = module if module is not None else fn
    if not isinstance(target, nn.Module):
        raise TypeError('count_flops needs the nn.Module that `fn` runs (pass it as `module`)')
    wrapped = _TensorForward(fn, target.eval())
    analyzer = FlopAnalyzer(wrapped, (inputs, ))
    analyzer.set_op_handle('aten::scaled_dot_product_attention', _sdpa_flop_jit)
    analyzer.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    return analyzer, wrapped


@torch.no_grad()
def count_flops(fn: Callable, inputs: torch.Tensor, module: nn.Module = None) -> int:
    """FLOPs (multiply-adds) of ``fn(inputs)``; ``module`` (default: ``fn`` itself) is put in eval mode."""
    return _flop_analyzer(fn, inputs, module)[0].total()


@torch.no_grad()
def count_flops_by_part(fn: Callable, inputs: torch.Tensor, module: nn.Module,
                        parts: Dict[str, Sequence[nn.Module]]) -> Dict[str, int]:
    """FLOPs of ``fn(inputs)`` (as :func:`count_flops`) split into ``parts`` (name -> submodules of ``module``,
    disjoint), plus ``'total'``."""
    analyzer, wrapped = _flop_analyzer(fn, inputs, module)
    per_module = analyzer.by_module()
    names = {id(m): name for name, m in wrapped.named_modules()}
    flops = {part: sum(per_module[names[id(m)]] for m in modules) for part, modules in parts.items()}
    flops['total'] = analyzer.total()
    return flops


def sparsity_parts(backbone: nn.Module) -> Dict[str, List[nn.Module]]:
    """The modules of a sparse backbone that routing adds or spares: the slow-path MLPs of routed blocks (what
    fast-path positions skip), the fast paths and the score predictors. Parts a backbone lacks are left out."""
    parts = {'slow-path MLPs': [], 'fast paths': [],
             'score predictors': list(getattr(backbone, 'score_predictors', None) or [])}
    for block in backbone.modules():
        if getattr(block, 'fast_path', None) is not None and hasattr(block, 'slow_path_modules'):
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
