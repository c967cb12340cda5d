"""Official U-ViT checkpoints (plain state dicts, e.g. ``nnet_ema.pth``) -> :class:`UViTDiffusion` checkpoints.

Our ``UViT`` keeps the official module names, so the network's keys are unchanged; they move under ``network.``.
"""
from typing import Dict, List, Optional, Tuple

import torch

from ..utils.checkpoint import CheckpointMismatchError

StateDict = Dict[str, torch.Tensor]
_HEADS_BY_WIDTH = {512: 8, 768: 12, 1024: 16, 1152: 16}


def infer_uvit_network(state_dict: StateDict, num_heads: Optional[int] = None) -> Tuple[dict, List[str]]:
    """The ``UViT`` config read off an official state dict's shapes, and notes on what had to be inferred.

    Checkpoints do not record the head count: it comes from ``num_heads``, else from the official width -> heads
    table, else 64 channels per head (noted).
    """
    try:
        patch = state_dict['patch_embed.proj.weight']
        dims, in_channels, patch_size = patch.shape[0], patch.shape[1], patch.shape[-1]
        depth = 2 * (1 + max(int(k.split('.')[1]) for k in state_dict if k.startswith('in_blocks.')))
        num_classes = state_dict['label_emb.weight'].shape[0] if 'label_emb.weight' in state_dict else 0
        extras = 2 if num_classes else 1
        side = int(round((state_dict['pos_embed'].shape[1] - extras) ** 0.5))
    except (KeyError, ValueError) as error:
        raise CheckpointMismatchError(f'cannot read the U-ViT arch off this checkpoint: missing {error}') from error
    if 'context_embed.weight' in state_dict:
        raise CheckpointMismatchError('text-to-image U-ViT checkpoints (context_embed) are not supported yet')
    notes = []
    if num_heads is None:
        num_heads = _HEADS_BY_WIDTH.get(dims)
    if num_heads is None:
        num_heads = max(1, dims // 64)
        notes.append(f'num_heads={num_heads} was inferred from the width {dims} (64 channels per head): checkpoints '
                     'do not record the head count, and this width is not one of the official U-ViTs '
                     f'({sorted(_HEADS_BY_WIDTH)}); pass --num-heads if the model was trained with another')
    if dims % num_heads:
        raise ValueError(f'num_heads={num_heads} does not divide the width {dims}')
    arch = dict(embed_dims=dims, depth=depth, num_heads=num_heads)
    return dict(type='UViT', arch=arch, img_size=side * patch_size, patch_size=patch_size, in_channels=in_channels,
                num_classes=num_classes, conv='final_layer.weight' in state_dict,
                mlp_time_embed='time_embed.0.weight' in state_dict), notes


def official_uvit_to_ours(state_dict: StateDict) -> StateDict:
    """An official plain U-ViT state dict -> :class:`UViTDiffusion` keys (``network.*``); ours pass unchanged."""
    if any(k.startswith('in_blocks.') for k in state_dict):
        return {f'network.{k}': v for k, v in state_dict.items()}
    return dict(state_dict)
