"""Slow / fast routing of map positions (dynamic spatial sparsification for hierarchical backbones)."""
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .token_ops import batch_gather, batch_scatter

TokenFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class SlowFastRouting:
    """Which positions of a (B, N, C) token map take the expensive slow path; the rest take the cheap fast path.

    Training: ``mask`` (B, N, 1), a differentiable 0/1 Gumbel sample; both paths run everywhere and are mixed by
    the mask so gradients reach the predictor. Inference: ``slow_index`` (B, K) and ``fast_index`` (B, N - K);
    each path runs only on its own positions, and the results are scattered back into a full map.
    """
    mask: Optional[torch.Tensor] = None
    slow_index: Optional[torch.Tensor] = None
    fast_index: Optional[torch.Tensor] = None

    def apply(self, tokens: torch.Tensor, slow_fn: TokenFn, fast_fn: TokenFn) -> torch.Tensor:
        """(B, N, C) -> (B, N, C'): ``slow_fn`` / ``fast_fn`` map (B, K, C) to (B, K, C') token-wise."""
        if self.mask is not None:
            mask = self.mask.to(tokens.dtype)
            return mask * slow_fn(tokens) + (1.0 - mask) * fast_fn(tokens)
        slow = slow_fn(batch_gather(tokens, self.slow_index))
        fast = fast_fn(batch_gather(tokens, self.fast_index))
        out = slow.new_empty(tokens.shape[0], tokens.shape[1], slow.shape[-1])
        out = batch_scatter(out, self.slow_index, slow)
        return batch_scatter(out, self.fast_index, fast.to(slow.dtype))
