"""FLOP counting on the inference path (the library's own use: DVT's exit costs; and the tools').

FLOPs follow fvcore's convention (one fused multiply-add = one FLOP), as the DynamicViT papers report them, and are
traced on the inference path, i.e. with the tokens really gathered. mmengine's counter has no rule for
``scaled_dot_product_attention``; one is added so that the attention matmuls (what token pruning saves
quadratically) are counted, exactly as explicit ``q @ k`` / ``attn @ v`` matmuls would be.
"""
from typing import Callable, Dict, Sequence

import torch
import torch.nn as nn
from mmengine.analysis import FlopAnalyzer
from mmengine.analysis.jit_handles import get_shape


def _sdpa_flop_jit(inputs, outputs) -> int:
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
