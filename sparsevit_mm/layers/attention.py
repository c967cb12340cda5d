"""Multi-head self-attention that can mask out dropped tokens while keeping them differentiable.

Training-time token pruning (DynamicViT) keeps every token in the tensor and masks the dropped ones inside attention
(:func:`softmax_with_keep_policy`, the official formula). Written out directly that formula holds (B, H, N, N)
tensors per block, which at a detector's 4,200 tokens needs tens of GiB. :func:`keep_policy_attention` computes the
same outputs and the same gradients (to q, k, v and to the policy) through ``scaled_dot_product_attention``, holding
nothing larger than (B, H, N, d) plus one block of (B, H, rows, N) logits at a time.
"""
import math
from typing import Iterator, Optional, Tuple

import torch
import torch.nn.functional as F
from timm.layers import Attention

# Rows of queries per block of the two passes over all (query, key) pairs (the max logit, the policy gradient's
# statistics): about this many float32 logits at a time, so a block stays small beside the activations (8 MiB on
# CPU, where small blocks also stay in cache; 128 MiB on a GPU, fewer kernel launches). At least a few dozen rows, so
# that a large batch does not loop row by row.
_BLOCK_LOGITS = {'cpu': 1 << 21}
_DEFAULT_BLOCK_LOGITS = 1 << 25
_MIN_BLOCK_ROWS = 32
# The virtual key's weight is returned in a value channel scaled by this power of two, so that under float16 it
# stays a normal number (its smallest value is eps / N).
_VIRTUAL_WEIGHT_SCALE = 4096.0
# A dropped key's extra channel: its logit falls by this times the scale, and exp() of that is 0 in every float
# format (the value itself fits float16).
_DROPPED_KEY_CHANNEL = -3.0e4


def softmax_with_keep_policy(logits: torch.Tensor, policy: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Attention weights in which no token attends to a dropped token, except the dropped token itself.

    The official DynamicViT formula, written out directly: it holds (B, H, N, N) tensors, so it is the reference
    for :func:`keep_policy_attention` and serves where the weights themselves are needed (attention dropout).
    Dropped tokens are masked multiplicatively (not with -inf) so that the 0/1 ``policy``, a straight-through
    Gumbel sample, passes gradients back to the score predictor. Computed in float32 for stability; the max of each
    row runs over every key, dropped ones included, and passes its gradient to the key it picks (``torch.max``, as
    the official code).

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
    weights = torch.exp(logits32 - logits32.max(dim=-1, keepdim=True).values) * key_mask
    weights = (weights + eps / num_tokens) / (weights.sum(dim=-1, keepdim=True) + eps)
    return weights.to(logits.dtype)


def _query_blocks(query: torch.Tensor, num_keys: int) -> Iterator[Tuple[int, int]]:
    """(start, stop) rows of ``query`` (B, H, N, d) such that one block of logits holds about ``_BLOCK_LOGITS``."""
    batch, heads, num_queries = query.shape[:3]
    budget = _BLOCK_LOGITS.get(query.device.type, _DEFAULT_BLOCK_LOGITS)
    rows = max(_MIN_BLOCK_ROWS, budget // max(1, batch * heads * num_keys))
    for start in range(0, num_queries, rows):
        yield start, min(num_queries, start + rows)


def _argmax_keys(query: torch.Tensor, key: torch.Tensor, scale: float) -> torch.Tensor:
    """(B, H, N) index of each query's largest logit over all keys (the first one at a tie, as ``torch.max``)."""
    index = torch.empty(query.shape[:3], dtype=torch.long, device=query.device)
    with torch.no_grad():
        # contiguous once: q, k are usually strided views of the qkv projection, which every block's matmul would
        # otherwise copy whole again
        scaled_query = query * scale
        keys_t = key.transpose(-2, -1).contiguous()
        for start, stop in _query_blocks(query, key.shape[-2]):
            index[:, :, start:stop] = (scaled_query[:, :, start:stop] @ keys_t).argmax(dim=-1)
    return index


def _head_width(head_dims: int, extra: int, device: torch.device) -> int:
    """Channels of the widened heads: ``head_dims + extra``, rounded up to a multiple of 8 off the CPU (the fused
    CUDA kernels need it; otherwise SDPA falls back to its N x N math path)."""
    width = head_dims + extra
    return width if device.type == 'cpu' else -(-width // 8) * 8


def _widen(x: torch.Tensor, *columns: torch.Tensor, width: int, extra_row: Optional[torch.Tensor] = None,
           dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """(B, H, N, d) ``x`` and (B, H, N) columns -> (B, H, N, width): ``x``, the columns, then zeros; with
    ``extra_row`` (B, H, 1, width) -> (B, H, N + 1, width). One allocation (in ``dtype``, default ``x``'s); autograd
    follows the writes."""
    batch, heads, rows, dims = x.shape
    out = x.new_zeros(batch, heads, rows + (extra_row is not None), width, dtype=dtype)
    out[:, :, :rows, :dims] = x
    for index, column in enumerate(columns):
        out[:, :, :rows, dims + index] = column
    if extra_row is not None:
        out[:, :, rows:] = extra_row
    return out


class _PolicyGradient(torch.autograd.Function):
    """Identity on the attention output; in backward, the gradient of the keep policy (B, N).

    The policy multiplies the attention weights: ``m_ij = p_j + (1 - p_j) [i = j]``, so its gradient is, at every
    key j, kept or dropped::

        dL/dp_j = sum over heads and queries i != j of  pi_ij (dO_i . v_j - dO_i . o_i),
        pi_ij = exp(s_ij - max_i) / (Z_i + eps) = exp(s_ij - L_i)

    with ``L_i = max_i + log(Z_i + eps)`` from the forward pass. ``sum_i pi_ij [dO_i, dO_i . o_i]`` is an attention
    of the keys (as queries) over the queries (as keys), whose logits ``s_ij - L_i`` SDPA gets through one extra
    channel. SDPA normalises over i; a virtual key of logit 0 and value (0, ..., 1) reads the normaliser back.
    """

    @staticmethod
    def forward(ctx, out, policy, query, key, value, log_normaliser, scale):
        ctx.save_for_backward(query, key, value, out, log_normaliser)
        ctx.scale = scale
        ctx.policy_dtype = policy.dtype
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad_out):
        query, key, value, out, log_normaliser = ctx.saved_tensors
        scale = ctx.scale
        batch, heads, num_tokens, head_dims = query.shape
        f32 = torch.float32
        grad32 = grad_out.to(f32)
        with torch.autocast(query.device.type, enabled=False):
            out_dot = (grad32 * out.to(f32)).sum(-1)  # dO_i . o_i
            width = _head_width(head_dims, 2, query.device)
            keys_as_queries = _widen(key, log_normaliser.new_ones(log_normaliser.shape), width=width, dtype=f32)
            virtual_key = log_normaliser.new_zeros(batch, heads, 1, width)  # logit 0
            queries_as_keys = _widen(query, -log_normaliser / scale, width=width, extra_row=virtual_key, dtype=f32)
            virtual_value = virtual_key.clone()
            virtual_value[..., head_dims + 1] = 1.0
            values = _widen(grad32, out_dot, width=width, extra_row=virtual_value)
            summed = F.scaled_dot_product_attention(keys_as_queries, queries_as_keys, values, scale=scale)
            # summed = (sum_i pi_ij [dO_i, D_i], 1) / (sum_i pi_ij + 1)
            weighted = summed[..., :head_dims + 1] / summed[..., head_dims + 1:head_dims + 2]
            grad_policy = (value.to(f32) * weighted[..., :head_dims]).sum(-1) - weighted[..., head_dims]
            # the diagonal (i = j) does not depend on the policy
            self_logit = (query.to(f32) * key.to(f32)).sum(-1) * scale
            self_term = torch.exp(self_logit - log_normaliser) * ((grad32 * value.to(f32)).sum(-1) - out_dot)
            grad_policy = (grad_policy - self_term).sum(1)
        return grad_out, grad_policy.to(ctx.policy_dtype), None, None, None, None, None


def keep_policy_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, policy: torch.Tensor,
                          scale: float, eps: float = 1e-6) -> torch.Tensor:
    """``softmax_with_keep_policy((query * scale) @ key^T, policy) @ value`` without any (B, H, N, N) tensor.

    Same outputs and same gradients (to query, key, value and policy; to 1e-6 in float32), the eps terms and the
    self-attention of dropped tokens included. Per query i, the direct formula's output is::

        o_i = (sum_j m_ij exp(s_ij - M_i) v_j + eps mean(V)) / (Z_i + eps),   Z_i = sum_j m_ij exp(s_ij - M_i)

    with M_i the largest logit over all keys. That is an ordinary softmax attention over the kept keys plus one
    virtual key whose logit is ``M_i + log(eps)`` and whose value is ``mean(V)``, which SDPA computes: the virtual
    logit and the dropped keys' -inf ride in two extra channels of query and key (no mask tensor). A dropped query
    also attends to itself; that term is added afterwards with the virtual key's weight, returned by SDPA in an
    extra value channel. Gradients to query, key and value come from SDPA's backward, the max's through the logit
    at its argmax (one pass over the logits in blocks of queries); the policy's, which a mask cannot carry, from
    :class:`_PolicyGradient`.

    Under autocast, the attention runs in the autocast dtype and the statistics (max logit, self logits,
    normalisers, the policy gradient) in float32, as fused kernels keep their softmax statistics.

    Args:
        query / key / value: (B, H, N, d).
        policy: (B, N) 1 kept / 0 dropped (a straight-through sample; other values are refused); the cls token
            should be kept.
        scale: logit scale (``head_dims ** -0.5``).
    Returns:
        (B, H, N, d) in the dtype of ``query``.
    """
    if not eps > 0:
        raise ValueError(f'eps must be > 0 (the formula divides by Z_i + eps, and Z_i may be 0), got {eps}')
    batch, heads, num_tokens, head_dims = query.shape
    f32 = torch.float32
    dtype = query.dtype
    kept = policy.detach() > 0.5
    if not torch.compiler.is_compiling() and policy.numel():
        # a straight-through sample is 0 / 1 up to rounding; a soft policy would be silently treated as one
        off = (policy.detach() - kept.to(policy.dtype)).abs().max().item()
        if off > 1e-3:
            raise ValueError(f'keep_policy_attention needs a 0 / 1 keep policy (a hard sample); got values '
                             f'{off:.3g} away from 0 or 1 (e.g. {policy.detach().flatten()[0].item():.3g})')
    argmax = _argmax_keys(query, key, scale)
    # logits of each query at its argmax and at itself, in float32 and differentiable (the max passes its gradient
    # to the key it picks, as torch.max does)
    key_at_max = key.gather(2, argmax.unsqueeze(-1).expand(-1, -1, -1, head_dims))
    max_logit = (query.to(f32) * key_at_max.to(f32)).sum(-1) * scale
    self_logit = (query.to(f32) * key.to(f32)).sum(-1) * scale
    log_eps = math.log(eps)

    width = _head_width(head_dims, 2, query.device)
    dropped_logit = torch.where(kept, 0.0, _DROPPED_KEY_CHANNEL).unsqueeze(1).expand(-1, heads, -1)
    # query [q, (M + log eps) / scale, 1]; key [k, 0, dropped]; virtual key [0, 1, 0]
    wide_query = _widen(query, (max_logit + log_eps) / scale, torch.ones_like(max_logit), width=width)
    virtual_key = query.new_zeros(batch, heads, 1, width)
    virtual_key[..., head_dims] = 1.0
    wide_key = _widen(key, torch.zeros_like(max_logit), dropped_logit, width=width, extra_row=virtual_key)
    # value [v, 0]; virtual value [mean(V), weight scale]
    mean_value = value.mean(dim=2, keepdim=True)
    virtual_value = _widen(mean_value, mean_value.new_full(mean_value.shape[:-1], _VIRTUAL_WEIGHT_SCALE), width=width)
    wide_value = _widen(value, width=width, extra_row=virtual_value)
    attended = F.scaled_dot_product_attention(wide_query, wide_key, wide_value, scale=scale)
    # the virtual key's weight eps / (Z_i + eps), Z_i over the kept keys
    virtual_weight = attended[..., head_dims].to(f32) / _VIRTUAL_WEIGHT_SCALE
    # a dropped query's own term, relative to that normaliser: exp(s_ii - M_i) / (Z_i + eps)
    self_weight = torch.where(kept.unsqueeze(1), 0.0, torch.exp(self_logit - max_logit) * virtual_weight / eps)
    out = (attended[..., :head_dims].to(f32) + self_weight.unsqueeze(-1) * value.to(f32)) / \
        (1.0 + self_weight.unsqueeze(-1))
    if policy.requires_grad:
        with torch.no_grad():  # L_i = M_i + log(Z_i + eps), the dropped query's own term included
            log_normaliser = max_logit + log_eps + torch.log1p(self_weight) - torch.log(virtual_weight)
        out = _PolicyGradient.apply(out, policy, query.detach(), key.detach(), value.detach(), log_normaliser,
                                    scale)
    return out.to(dtype)


class KeepPolicyAttention(Attention):
    """timm's multi-head self-attention over (B, N, C) tokens, which also takes a (B, N) keep policy.

    Without a policy, ``forward`` is timm's own (``scaled_dot_product_attention`` where timm fuses attention).
    With one, dropped tokens are masked as in :func:`softmax_with_keep_policy` (the training path of token
    pruning), computed by :func:`keep_policy_attention` without (B, H, N, N) tensors; with attention dropout in
    training the weights themselves are needed, and the direct formula runs. The inherited ``qkv`` / ``scale`` /
    ``attn_drop`` / ``proj`` / ``proj_drop`` are used throughout.

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
        if self.training and self.attn_drop.p > 0:
            x = self.attn_drop(softmax_with_keep_policy((q * self.scale) @ k.transpose(-2, -1), policy)) @ v
        else:
            x = keep_policy_attention(q, k, v, policy, self.scale)
        x = self.norm(x.transpose(1, 2).reshape(batch, num_tokens, self.attn_dim))
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))
