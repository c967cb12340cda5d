"""The score predictor: which tokens (or map positions) are worth the full computation."""
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


class TokenScorePredictor(nn.Module):
    """Local-global score predictor of DynamicViT.

    ``LayerNorm -> Linear -> GELU``; half of the channels stay per token (local), the other half is averaged
    over the tokens still kept (global) and broadcast back; an MLP ``C -> C/2 -> C/4 -> 2`` then gives
    log-probabilities. Channel 0 is "keep", channel 1 "drop".

    Works on tokens (B, N, C); a feature map is passed as ``x.flatten(2).transpose(1, 2)``.

    Args:
        embed_dims: channels C (even).
        norm_eps: LayerNorm epsilon (1e-5 for ViT / Swin, 1e-6 for ConvNeXt).
    """

    def __init__(self, embed_dims: int, norm_eps: float = 1e-5):
        super().__init__()
        if embed_dims % 4:
            raise ValueError(f'TokenScorePredictor needs embed_dims divisible by 4, got {embed_dims}')
        self.norm = nn.LayerNorm(embed_dims, eps=norm_eps)
        self.in_proj = nn.Linear(embed_dims, embed_dims)
        self.classifier = nn.Sequential(
            nn.Linear(embed_dims, embed_dims // 2), nn.GELU(),
            nn.Linear(embed_dims // 2, embed_dims // 4), nn.GELU(),
            nn.Linear(embed_dims // 4, 2))

    def forward(self, x: torch.Tensor, policy: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: (B, N, C); policy: optional (B, N, 1) weights of tokens still kept. Returns (B, N, 2)."""
        x = F.gelu(self.in_proj(self.norm(x)))
        local, context = x.chunk(2, dim=-1)
        if policy is None:
            context = context.mean(dim=1, keepdim=True)
        else:
            # The clamp only matters if every token of a sample was dropped (the paper divides 0 by 0).
            context = (context * policy).sum(dim=1, keepdim=True) / policy.sum(dim=1, keepdim=True).clamp_min(1e-6)
        # The classifier's first layer sees [local, context]; the context half is the same for every token of a
        # sample, so its product is taken once per sample instead of once per token (same result, fewer FLOPs).
        first, half = self.classifier[0], local.shape[-1]
        x = F.linear(local, first.weight[:, :half]) + F.linear(context, first.weight[:, half:], first.bias)
        return F.log_softmax(self.classifier[1:](x), dim=-1)


# The official DynamicViT / DynamicSwin / DynamicCNN predictors name the same layers by position in two Sequentials
_OFFICIAL_NAMES = (('in_conv.0.', 'norm.'), ('in_conv.1.', 'in_proj.'), ('out_conv.0.', 'classifier.0.'),
                   ('out_conv.2.', 'classifier.2.'), ('out_conv.4.', 'classifier.4.'))


def official_predictor_key(key: str) -> str:
    """A key inside an official score predictor (``in_conv.0.weight``, ...) -> :class:`TokenScorePredictor`'s
    (``norm.weight``, ...); other keys are returned as they are."""
    for old, new in _OFFICIAL_NAMES:
        if key.startswith(old):
            return new + key[len(old):]
    return key
