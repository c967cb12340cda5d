"""Multi-head self-attention that can mask out dropped tokens while keeping them differentiable."""
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


def softmax_with_keep_policy(logits: torch.Tensor, policy: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Attention weights in which no token attends to a dropped token, except the dropped token itself.

    Dropped tokens are masked multiplicatively (not with -inf) so that the 0/1 ``policy``, a straight-through
    Gumbel sample, passes gradients back to the score predictor. Computed in float32 for stability.

    Args:
        logits: (B, H, N, N) scaled attention logits.
        policy: (B, N) 1 for tokens kept, 0 for tokens dropped.
    Returns:
        (B, H, N, N) attention weights in the dtype of ``logits``.
    """
    num_tokens = logits.shape[-1]
    key_mask = policy.reshape(policy.shape[0], 1, 1, num_tokens).float()
    eye = torch.eye(num_tokens, dtype=key_mask.dtype, device=key_mask.device)
    key_mask = key_mask + (1.0 - key_mask) * eye
    logits32 = logits.float()
    weights = torch.exp(logits32 - logits32.amax(dim=-1, keepdim=True)) * key_mask
    weights = (weights + eps / num_tokens) / (weights.sum(dim=-1, keepdim=True) + eps)
    return weights.to(logits.dtype)


class KeepPolicyAttention(nn.Module):
    """Self-attention over (B, N, C) tokens.

    Without a policy it is ordinary attention through ``scaled_dot_product_attention`` (flash / memory-
    efficient kernels where available). With a (B, N) keep policy, dropped tokens are masked as in
    :func:`softmax_with_keep_policy` (the training path of token pruning).
    """

    def __init__(self, embed_dims: int, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0):
        super().__init__()
        if embed_dims % num_heads:
            raise ValueError(f'embed_dims {embed_dims} is not divisible by num_heads {num_heads}')
        self.num_heads = num_heads
        self.head_dims = embed_dims // num_heads
        self.scale = self.head_dims ** -0.5
        self.qkv = nn.Linear(embed_dims, embed_dims * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(embed_dims, embed_dims)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, policy: Optional[torch.Tensor] = None) -> torch.Tensor:
        batch, num_tokens, channels = x.shape
        qkv = self.qkv(x).reshape(batch, num_tokens, 3, self.num_heads, self.head_dims).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, H, N, d)
        drop = self.attn_drop if self.training else 0.0
        if policy is None:
            x = F.scaled_dot_product_attention(q, k, v, dropout_p=drop)
        else:
            weights = softmax_with_keep_policy((q * self.scale) @ k.transpose(-2, -1), policy)
            x = F.dropout(weights, drop, self.training) @ v
        x = x.transpose(1, 2).reshape(batch, num_tokens, channels)
        return self.proj_drop(self.proj(x))
