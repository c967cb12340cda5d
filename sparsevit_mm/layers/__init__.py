"""Shared token-sparsity building blocks: scoring, top-k selection, gather / scatter, keep-policy attention, token
pruning (plain ViTs) and slow / fast routing (hierarchical backbones)."""
from .attention import KeepPolicyAttention, keep_policy_attention, softmax_with_keep_policy
from .init import init_vit_weights
from .predictor import TokenScorePredictor, official_predictor_key
from .pruning import TokenPruning
from .routing import SlowFastRouting
from .token_ops import (batch_gather, batch_scatter, check_keep_ratios, check_prune_layers, default_prune_layers,
                        flat_rows, keep_ratio_loss, keep_ratio_terms, num_kept, sample_keep_decision, split_by_score,
                        stage_keep_ratios, topk_indices)

__all__ = [
    'init_vit_weights', 'KeepPolicyAttention', 'keep_policy_attention', 'softmax_with_keep_policy',
    'TokenScorePredictor', 'official_predictor_key', 'TokenPruning',
    'SlowFastRouting', 'batch_gather', 'batch_scatter', 'check_keep_ratios', 'check_prune_layers',
    'default_prune_layers', 'flat_rows', 'keep_ratio_loss', 'keep_ratio_terms', 'num_kept', 'sample_keep_decision',
    'split_by_score', 'stage_keep_ratios', 'topk_indices'
]
