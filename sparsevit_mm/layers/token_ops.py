"""Token-sparsity primitives shared by every dynamic backbone.

Shapes: B batch, N tokens, K selected tokens, C channels. Indices are always ``(B, K)`` long tensors
that index dimension 1 of a ``(B, N, C)`` token tensor.
"""
import numbers
from typing import List, Optional, Sequence, Union

import torch
import torch.nn.functional as F


def flat_rows(index: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Per-sample indices (B, K) -> (B * K, ) row numbers of the same tokens in the (B * N, C) matrix that a
    contiguous (B, N, C) tensor is. Rows are copied as whole blocks of C values (``index_select`` /
    ``index_copy_``), several times faster on CPU than an element-wise ``gather`` with an expanded index."""
    offsets = torch.arange(0, index.shape[0] * num_tokens, num_tokens, device=index.device)
    return (index + offsets.unsqueeze(1)).flatten()


def batch_gather(tokens: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Select ``index`` (B, K) from ``tokens`` (B, N, C) per sample -> (B, K, C)."""
    batch, num_tokens, channels = tokens.shape
    rows = flat_rows(index, num_tokens)
    # K from the index, not -1: an empty batch (B = 0) leaves -1 undetermined
    return tokens.reshape(batch * num_tokens, channels).index_select(0, rows).view(batch, index.shape[1], channels)


def batch_scatter(tokens: torch.Tensor, index: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Out-of-place write of ``values`` (B, K, C) into ``tokens`` (B, N, C) at ``index`` (B, K) -> (B, N, C)."""
    batch, num_tokens, channels = tokens.shape
    rows = flat_rows(index, num_tokens)
    flat = tokens.reshape(batch * num_tokens, channels)
    return flat.index_copy(0, rows, values.reshape(-1, channels).to(tokens.dtype)).view(batch, num_tokens, channels)


def topk_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (B, k) of the ``k`` highest ``scores`` (B, N), highest first."""
    return scores.topk(k, dim=1, sorted=True).indices


def split_by_score(scores: torch.Tensor, k: int):
    """Split positions by ``scores`` (B, N) into the ``k`` best (B, k) and the rest (B, N - k)."""
    order = scores.argsort(dim=1, descending=True)
    return order[:, :k], order[:, k:]


def num_kept(num_tokens: int, ratio: float) -> int:
    """How many of ``num_tokens`` a keep ``ratio`` keeps at inference (truncated, as the paper; at least 1)."""
    return max(1, int(num_tokens * ratio))


def sample_keep_decision(log_probs: torch.Tensor, previous: Optional[torch.Tensor] = None,
                         tau: float = 1.0) -> torch.Tensor:
    """Hard, differentiable keep decisions (straight-through Gumbel-softmax).

    Args:
        log_probs: (B, N, 2) log-probabilities from a score predictor; channel 0 means "keep".
        previous: (B, N, 1) earlier decision; a token dropped before stays dropped (decisions nest).
    Returns:
        (B, N, 1) tensor of exact 0/1 values that carries gradients to ``log_probs``.
    """
    decision = F.gumbel_softmax(log_probs, tau=tau, hard=True)[..., :1]
    return decision if previous is None else decision * previous


def keep_ratio_loss(decisions: Sequence[torch.Tensor], targets: Sequence[float]) -> torch.Tensor:
    """Squared error between each sample's kept fraction and its stage target, averaged over stages.

    Args:
        decisions: per stage, a (B, N) or (B, N, 1) 0/1 mask of positions kept (or sent to the slow path).
        targets: per stage, the fraction of positions that should be kept.
    """
    if len(decisions) != len(targets):
        raise ValueError(f'got {len(decisions)} decision masks but {len(targets)} keep-ratio targets')
    per_stage = [((d.flatten(1).mean(1) - t) ** 2).mean() for d, t in zip(decisions, targets)]
    return torch.stack(per_stage).mean()


def keep_ratio_terms(decisions: Sequence[torch.Tensor], targets: Sequence[float], weight: float) -> dict:
    """Loss-dict entries: ``loss_keep_ratio`` (weighted) and, for the log, each stage's mean kept fraction."""
    terms = {'loss_keep_ratio': weight * keep_ratio_loss(decisions, targets[:len(decisions)])}
    for stage, decision in enumerate(decisions, start=1):
        terms[f'keep_ratio_stage{stage}'] = decision.detach().float().mean()
    return terms


def _real(value, name: str) -> float:
    """``value`` as a float if it is a real number (not a bool, which would silently read as 0 or 1)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f'{name} must be a number, got {value!r}')
    return float(value)


def check_keep_ratios(ratios: Sequence[float], decreasing: bool = True) -> List[float]:
    """Validate per-stage keep ratios: each a number in (0, 1] and (optionally) non-increasing."""
    ratios = [_real(r, 'each keep ratio') for r in ratios]
    for r in ratios:
        if not 0.0 < r <= 1.0:
            raise ValueError(f'keep ratios must lie in (0, 1], got {r} in {ratios}')
    if decreasing and any(b > a for a, b in zip(ratios, ratios[1:])):
        raise ValueError(f'keep ratios must not increase from one pruning stage to the next, got {ratios}')
    return ratios


def stage_keep_ratios(keep_ratio: Union[float, Sequence[float]], num_stages: int,
                      schedule: str = 'geometric', step: float = 0.2) -> List[float]:
    """Per-stage keep ratios from a base ``keep_ratio`` or an explicit list.

    ``geometric`` gives ``[r, r**2, r**3, ...]`` (DynamicViT: cumulative fractions of all tokens);
    ``linear`` gives ``[r, r - step, r - 2 * step, ...]`` (dynamic Swin / ConvNeXt: slow-path fractions).
    A list is used as given (its length must equal ``num_stages``).
    """
    if isinstance(keep_ratio, (list, tuple)):
        if len(keep_ratio) != num_stages:
            raise ValueError(f'keep_ratio has {len(keep_ratio)} values but there are {num_stages} pruning '
                             f'stages; give one float or {num_stages} values')
        return check_keep_ratios(keep_ratio)
    r = _real(keep_ratio, 'keep_ratio')
    if not 0.0 < r <= 1.0:
        raise ValueError(f'keep_ratio must lie in (0, 1], got {keep_ratio}')
    if schedule == 'geometric':
        ratios = [r ** (s + 1) for s in range(num_stages)]
    elif schedule == 'linear':
        ratios = [r - step * s for s in range(num_stages)]
        if r < 1.0 and ratios[-1] <= 0.0:
            raise ValueError(f'keep_ratio={keep_ratio} with a step of {step} per stage leaves '
                             f'{ratios[-1]:.2f} for the last of {num_stages} stages; the smallest allowed is '
                             f'{step * (num_stages - 1):.2f} (exclusive)')
        if r == 1.0:  # 1.0 means dense everywhere, not 1.0 / 0.8 / 0.6
            ratios = [1.0] * num_stages
    else:
        raise ValueError(f"schedule must be 'geometric' or 'linear', got {schedule!r}")
    return check_keep_ratios(ratios)


def default_prune_layers(depth: int, num_stages: int = 3) -> List[int]:
    """Evenly spaced predictor positions in a sparse stage of ``depth`` blocks: 6 -> 1, 2, 3; 18 -> 2, 4, 6;
    27 -> 3, 6, 9 (the official DynamicSwin / DynamicCNN settings)."""
    stride = max(1, depth // 9)
    return [stride * (s + 1) for s in range(num_stages)]


def check_prune_layers(prune_layers: Sequence[int], depth: int, name: str = 'prune_layers') -> List[int]:
    """Validate block indices that get a score predictor (it runs before that block): in [0, depth), increasing."""
    layers = list(prune_layers)
    not_int = [i for i in layers if isinstance(i, bool) or not isinstance(i, numbers.Integral)]
    if not_int:
        raise ValueError(f'{name} {layers}: {not_int} are not block indices (integers)')
    layers = [int(i) for i in layers]
    if not layers:
        raise ValueError(f'{name} must name at least one block, got {list(prune_layers)}')
    bad = [i for i in layers if not 0 <= i < depth]
    if bad:
        raise ValueError(f'{name} {layers}: {bad} out of range; allowed block indices are 0..{depth - 1} '
                         f'(a predictor runs before the block it names)')
    if any(b <= a for a, b in zip(layers, layers[1:])):
        raise ValueError(f'{name} must be strictly increasing, got {layers}')
    return layers
