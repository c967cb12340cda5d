"""LV-ViT's classification head: the cls-token classifier plus the best per-token (token-labeling) score."""
from typing import Sequence

import torch
import torch.nn as nn
from mmpretrain.models.heads import ClsHead


class TokenLabelingClsHead(ClsHead):
    """``cls_fc(cls token) + token_weight * max over tokens of token_fc(token)``.

    Input: the backbone's ``'raw'`` tokens, (B, 1 + K, C) with the cls token first (K may be fewer than all patch
    tokens after pruning: only the remaining tokens compete for the max). The classification loss is applied to
    the cls-token logits alone, as LV-ViT / DynamicViT train it.
    """

    def __init__(self, num_classes: int, in_channels: int, token_weight: float = 0.5,
                 init_cfg: dict = dict(type='TruncNormal', layer='Linear', std=0.02), **kwargs):
        super().__init__(init_cfg=init_cfg, **kwargs)
        if num_classes <= 0:
            raise ValueError(f'num_classes={num_classes} must be a positive integer')
        self.num_classes = num_classes
        self.token_weight = token_weight
        self.cls_fc = nn.Linear(in_channels, num_classes)
        self.token_fc = nn.Linear(in_channels, num_classes)

    @staticmethod
    def _tokens(feats: Sequence[torch.Tensor]) -> torch.Tensor:
        tokens = feats[-1]
        if tokens.dim() != 3:
            raise ValueError(f'TokenLabelingClsHead needs (B, 1 + K, C) tokens (backbone out_type="raw"), '
                             f'got a tensor of shape {tuple(tokens.shape)}')
        return tokens

    def cls_logits(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        """(B, num_classes) logits of the cls token; what the training loss uses."""
        return self.cls_fc(self._tokens(feats)[:, 0])

    def token_logits(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        """(B, K, num_classes) per-token logits."""
        return self.token_fc(self._tokens(feats)[:, 1:])

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.cls_logits(feats) + self.token_weight * self.token_logits(feats).amax(dim=1)

    def loss(self, feats, data_samples, **kwargs) -> dict:
        return self._get_loss(self.cls_logits(feats), data_samples, **kwargs)
