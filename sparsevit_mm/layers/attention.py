"""Multi-head self-attention that can mask out dropped tokens while keeping them differentiable."""
from typing import Optional

import torch
from timm.layers import Attention


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


class KeepPolicyAttention(Attention):
    """timm's multi-head self-attention over (B, N, C) tokens, which also takes a (B, N) keep policy.

    Without a policy, ``forward`` is timm's own (``scaled_dot_product_attention`` where timm fuses attention).
    With one, dropped tokens are masked as in :func:`softmax_with_keep_policy` (the training path of token
    pruning), with the inherited ``qkv`` / ``scale`` / ``attn_drop`` / ``proj`` / ``proj_drop``.

    Args:
        embed_dims / num_heads / qkv_bias / attn_drop / proj_drop: as timm's ``Attention`` (``dim``, ...).
        attention_options: any further timm ``Attention`` arguments (what timm's ``Block`` passes).
    """

    def __init__(self, embed_dims: int, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, **attention_options):
        if embed_dims % num_heads:
            raise ValueError(f'embed_dims {embed_dims} is not divisible by num_heads {num_heads}')
        super().__init__(embed_dims, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop,
                         **attention_options)

    def forward(self, x: torch.Tensor, policy: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: (B, N, C); policy: (B, N) 1 kept / 0 dropped, or None. Returns (B, N, C)."""
        if policy is None:
            return super().forward(x)
        batch, num_tokens, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        qkv = self.qkv(x).reshape(batch, num_tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, H, N, d)
        q, k = self.q_norm(q), self.k_norm(k)
        weights = softmax_with_keep_policy((q * self.scale) @ k.transpose(-2, -1), policy)
        x = self.norm((self.attn_drop(weights) @ v).transpose(1, 2).reshape(batch, num_tokens, self.attn_dim))
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))
