"""FLOPs and throughput measurement shared by ``tools/analysis``.

FLOPs follow fvcore's convention (one fused multiply-add = one FLOP), as the DynamicViT papers report them, and are
traced on the inference path, i.e. with the tokens really gathered. mmengine's counter has no rule for
``scaled_dot_product_attention``; we add one so the attention matmuls (what token pruning saves quadratically) are
counted, exactly as the explicit ``q @ k`` / ``attn @ v`` matmuls would be.
"""
import ctypes
import ctypes.util
import statistics
import time
from typing import Callable, Dict, List, Sequence, Tuple

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


@torch.no_grad()
def count_flops(fn: Callable, inputs: torch.Tensor, module: nn.Module = None) -> int:
    """FLOPs (multiply-adds) of ``fn(inputs)``; ``module`` (default: ``fn`` itself) is put in eval mode."""
    from mmengine.analysis import FlopAnalyzer
    target = module if module is not None else fn
    if not isinstance(target, nn.Module):
        raise TypeError('count_flops needs the nn.Module that `fn` runs (pass it as `module`)')
    wrapped = _TensorForward(fn, target.eval())
    analyzer = FlopAnalyzer(wrapped, (inputs, ))
    analyzer.set_op_handle('aten::scaled_dot_product_attention', _sdpa_flop_jit)
    analyzer.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    return analyzer.total()


def _sync(device: torch.device):
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
            _sync(device)
            start = time.perf_counter()
            for _ in range(iters):
                fn(inputs)
            _sync(device)
            results[name].append(iters * inputs.shape[0] / (time.perf_counter() - start))
            bar.update()


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def round_speedups(results: Dict[str, List[float]], baseline: str) -> Dict[str, List[float]]:
    """Per-round speed-up of every candidate over ``baseline`` (both timed in the same round, so a slow spell of a
    shared machine cancels out) -> name -> one ratio per round."""
    return {name: [ours / base for ours, base in zip(values, results[baseline])] for name, values in results.items()}


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
