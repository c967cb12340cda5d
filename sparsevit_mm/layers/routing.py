"""Slow / fast routing of map positions (dynamic spatial sparsification for hierarchical backbones)."""
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .token_ops import flat_rows

TokenFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class SlowFastRouting:
    """Which positions of a (B, N, C) token map take the expensive slow path; the rest take the cheap fast path.

    Training: ``mask`` (B, N, 1), a differentiable 0/1 Gumbel sample; both paths run everywhere and are mixed by
    the mask so gradients reach the predictor. Inference: ``slow_rows`` (B * K, ) and ``fast_rows``
    (B * (N - K), ), the positions as rows of the (B * N, C) matrix (see :func:`flat_rows`); each path runs only on
    its own rows, and the results are added back into the rows of the residual stream.
    """
    mask: Optional[torch.Tensor] = None
    slow_rows: Optional[torch.Tensor] = None
    fast_rows: Optional[torch.Tensor] = None

    @classmethod
    def from_indices(cls, slow_index: torch.Tensor, fast_index: torch.Tensor, num_tokens: int) -> 'SlowFastRouting':
        """Inference routing from per-sample position indices (B, K) and (B, N - K)."""
        # Ascending rows: both paths then read and write memory front to back.
        return cls(slow_rows=flat_rows(slow_index, num_tokens).sort().values,
                   fast_rows=flat_rows(fast_index, num_tokens).sort().values)

    def residual_update(self, residual: torch.Tensor, tokens: torch.Tensor, slow_fn: TokenFn, fast_fn: TokenFn,
                        drop_path: Optional[TokenFn] = None) -> torch.Tensor:
        """``residual + drop_path(slow_fn / fast_fn of tokens)`` for (B, N, C) ``residual`` and (B, N, C_in)
        ``tokens``; ``slow_fn`` / ``fast_fn`` map (M, C_in) to (M, C) row-wise.

        Training mixes both paths by the mask. Inference adds each path's result to its own rows of ``residual``;
        with autograd off that happens in place (no full-map pass at all): a contiguous ``residual`` is updated and
        returned. (``drop_path`` is the identity at inference.)
        """
        if self.mask is not None:
            mask = self.mask.to(tokens.dtype)
            update = mask * slow_fn(tokens) + (1.0 - mask) * fast_fn(tokens)
            return residual + (update if drop_path is None else drop_path(update))
        batch, num_tokens, channels = residual.shape
        out = residual.reshape(batch * num_tokens, channels)
        flat = tokens.reshape(batch * num_tokens, tokens.shape[-1])
        if torch.is_grad_enabled():  # autograd may still need the caller's tensor: add out of place
            out = out.index_add(0, self.slow_rows, slow_fn(flat.index_select(0, self.slow_rows)).to(out.dtype))
            return out.index_add(0, self.fast_rows, fast_fn(flat.index_select(0, self.fast_rows)).to(out.dtype)
                                 ).view(batch, num_tokens, channels)
        out.index_add_(0, self.slow_rows, slow_fn(flat.index_select(0, self.slow_rows)).to(out.dtype))
        out.index_add_(0, self.fast_rows, fast_fn(flat.index_select(0, self.fast_rows)).to(out.dtype))
        return out.view(batch, num_tokens, channels)
