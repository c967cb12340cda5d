"""Token pruning of a plain ViT (DynamicViT), one pruning stage at a time; the cls token (row 0) is always kept."""
from dataclasses import dataclass
from typing import Optional

import torch

from .predictor import TokenScorePredictor
from .token_ops import batch_gather, batch_scatter, num_kept, sample_keep_decision, topk_indices


@dataclass
class TokenPruning:
    """What token pruning has decided so far in one forward pass over (B, 1 + N, C) tokens (cls first).

    Training (:meth:`sample`): every token stays in the tensor; ``decision`` (B, N, 1) is the cumulative 0/1 keep
    mask of the N patch tokens (a differentiable Gumbel sample) and ``policy`` (B, 1 + N) the same with the cls
    token, for :class:`KeepPolicyAttention`. Inference (:meth:`select`): the dropped tokens leave the tensor;
    ``kept`` (B, K) holds the absolute patch positions of the K patch tokens still in it and, with
    ``keep_dropped``, ``dropped`` (B, N, C) every patch token's features from when it was last seen (to put the
    dropped tokens back into a feature map, :meth:`fill_back`).
    """
    num_patches: int
    keep_dropped: bool = False
    decision: Optional[torch.Tensor] = None
    policy: Optional[torch.Tensor] = None
    kept: Optional[torch.Tensor] = None
    dropped: Optional[torch.Tensor] = None

    def sample(self, predictor: TokenScorePredictor, tokens: torch.Tensor) -> torch.Tensor:
        """Training step on (B, 1 + N, C) tokens: a new keep decision nested in the previous one, scored over the
        tokens still kept; updates ``decision`` and ``policy``. Returns the decision as (B, N)."""
        batch = tokens.shape[0]
        previous = self.decision if self.decision is not None else tokens.new_ones(batch, self.num_patches, 1)
        self.decision = sample_keep_decision(predictor(tokens[:, 1:], previous), previous)
        self.policy = torch.cat([tokens.new_ones(batch, 1), self.decision.squeeze(-1)], dim=1)
        return self.decision.squeeze(-1)

    def select(self, predictor: TokenScorePredictor, tokens: torch.Tensor, keep_ratio: float) -> torch.Tensor:
        """Inference step: (B, 1 + K, C) tokens -> (B, 1 + K', C), the cls token and the K' = ``num_kept(N,
        keep_ratio)`` best-scored patch tokens, best first; updates ``kept`` (and ``dropped``)."""
        batch = tokens.shape[0]
        if self.kept is None:
            self.kept = torch.arange(self.num_patches, device=tokens.device).expand(batch, -1)
        if self.keep_dropped:
            self.dropped = self.fill_back(tokens[:, 1:])
        keep = topk_indices(predictor(tokens[:, 1:])[..., 0], num_kept(self.num_patches, keep_ratio))
        self.kept = self.kept.gather(1, keep)
        # the cls token (row 0) and the kept patch tokens, in one gather
        return batch_gather(tokens, torch.cat([keep.new_zeros(batch, 1), keep + 1], dim=1))

    def fill_back(self, patches: torch.Tensor) -> torch.Tensor:
        """The current patch tokens (B, K, C) written at their positions ``kept`` into the (B, N, C) map of
        ``dropped`` (zeros where nothing was seen yet)."""
        full = self.dropped
        if full is None:
            full = patches.new_zeros(patches.shape[0], self.num_patches, patches.shape[-1])
        return batch_scatter(full, self.kept, patches)
