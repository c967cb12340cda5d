"""A per-process cache of small constant tensors (index layouts, masks, resampling matrices) that is safe to use
inside traced code."""
import functools
from typing import Callable, Optional

import torch


def eager_cache(maxsize: Optional[int] = 64) -> Callable:
    """``functools.lru_cache`` that is bypassed while ``torch.compile``, ``torch.export`` or the ONNX exporter trace
    the caller: a tensor made during a trace is a fake tensor, or belongs to that graph, and must neither outlive
    it in the cache (later eager calls would compute on fake tensors and return fake outputs) nor be shared with
    another graph. Each graph then holds its own copy as a constant."""
    def decorate(fn: Callable) -> Callable:
        cached = functools.lru_cache(maxsize=maxsize)(fn)

        @functools.wraps(fn)
        def lookup(*args):
            if torch.compiler.is_compiling():
                return fn(*args)
            return cached(*args)
        lookup.cache_info, lookup.cache_clear = cached.cache_info, cached.cache_clear
        return lookup
    return decorate
