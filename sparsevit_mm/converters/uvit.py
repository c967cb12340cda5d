"""Official U-ViT checkpoints (plain state dicts, e.g. ``nnet_ema.pth``) -> :class:`UViTDiffusion` checkpoints.

Our ``UViT`` keeps the official module names, so the network's keys are unchanged; they move under ``network.``.
"""
from typing import Dict, Tuple

import torch

from ..utils.checkpoint import CheckpointMismatchError

StateDict = Dict[str, torch.Tensor]
_HEADS_BY_WIDTH = {512: 8, 768: 12, 1024: 16, 1152: 16}


def infer_uvit_network(state_dict: StateDict) -> dict:
    """The ``UViT`` config read off an official state dict's shapes (heads from the official width -> heads table)."""
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
    arch = dict(embed_dims=dims, depth=depth, num_heads=_HEADS_BY_WIDTH.get(dims, max(1, dims // 64)))
    return dict(type='UViT', arch=arch, img_size=side * patch_size, patch_size=patch_size, in_channels=in_channels,
                num_classes=num_classes, conv='final_layer.weight' in state_dict,
                mlp_time_embed='time_embed.0.weight' in state_dict)


def official_uvit_to_ours(state_dict: StateDict) -> Tuple[StateDict, dict]:
    """-> (``network.*`` state dict, the ``UViT`` network config)."""
    return {f'network.{k}': v for k, v in state_dict.items()}, infer_uvit_network(state_dict)
