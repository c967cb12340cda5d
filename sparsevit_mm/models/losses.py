"""Distillation terms of the DynamicViT objective (the keep-ratio term lives in :mod:`sparsevit_mm.layers`)."""
from typing import Optional

import torch
import torch.nn.functional as F


def logit_distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) of the class distributions, averaged over the batch (temperature 1)."""
    return F.kl_div(F.log_softmax(student_logits.float(), dim=-1), F.log_softmax(teacher_logits.float(), dim=-1),
                    reduction='batchmean', log_target=True)


def token_distillation_loss(student_tokens: torch.Tensor, teacher_tokens: torch.Tensor,
                            keep_mask: Optional[torch.Tensor] = None, mode: str = 'mse') -> torch.Tensor:
    """Distillation on the tokens the student kept.

    Args:
        student_tokens / teacher_tokens: (B, N, D) final token features (``mse``) or per-token logits (``kl``).
        keep_mask: (B, N) 1 where the student kept the token; None means every token.
        mode: ``'mse'``: mean squared error over kept tokens and channels; ``'kl'``: KL(teacher || student) of
            per-token class distributions, averaged over kept tokens.
    """
    if student_tokens.shape != teacher_tokens.shape:
        raise ValueError(f'student tokens {tuple(student_tokens.shape)} and teacher tokens '
                         f'{tuple(teacher_tokens.shape)} differ; the teacher must see the same patch grid')
    if keep_mask is not None:
        selected = keep_mask > 0.5
        if not selected.any():
            return student_tokens.sum() * 0.0
        student_tokens, teacher_tokens = student_tokens[selected], teacher_tokens[selected]
    if mode == 'mse':
        return (student_tokens.float() - teacher_tokens.float()).pow(2).mean()
    if mode == 'kl':
        return logit_distillation_loss(student_tokens.reshape(-1, student_tokens.shape[-1]),
                                       teacher_tokens.reshape(-1, teacher_tokens.shape[-1]))
    raise ValueError(f"token distillation mode must be 'mse' or 'kl', got {mode!r}")
