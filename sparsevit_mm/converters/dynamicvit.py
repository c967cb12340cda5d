"""Checkpoint layouts of plain ViTs -> the :class:`~sparsevit_mm.models.DynamicViT` layout.

Our backbone keeps the official module names (``patch_embed.proj``, ``blocks.N.attn.qkv``, ``blocks.N.mlp.fc1``,
``norm``, ...), which the official DynamicViT, official DeiT, timm and LV-ViT checkpoints share, and names the
score predictors plainly. Supported inputs:

* official DynamicViT / LV-ViT (``score_predictor.K.in_conv.0`` ...), official DeiT / timm DeiT, LV-ViT;
* mmpretrain's and mmseg's ``VisionTransformer`` (``layers.N.ln1``, ``ffn.layers.0.0``, mmseg's
  ``attn.attn.in_proj_weight``, ...), e.g. mmpretrain DeiT or an mmseg ViT UperNet's backbone;
* our own backbone keys, or our classifier keys (``backbone.*``, ``head.*``).
"""
import re
from typing import Dict, List, Optional, Tuple

import torch

from ..utils.checkpoint import CheckpointMismatchError

StateDict = Dict[str, torch.Tensor]

# official predictor names -> ours
_PREDICTOR_RENAMES = (('in_conv.0.', 'norm.'), ('in_conv.1.', 'in_proj.'), ('out_conv.0.', 'classifier.0.'),
                      ('out_conv.2.', 'classifier.2.'), ('out_conv.4.', 'classifier.4.'))
# classifier-level keys of the official / timm layouts
_OFFICIAL_HEAD_PREFIXES = ('head.', 'aux_head.', 'head_dist.', 'fc_norm.')
# mmpretrain / mmseg VisionTransformer -> ours (mmseg's attention wraps nn.MultiheadAttention, whose in_proj stacks
# q, k, v exactly as one qkv Linear does)
_MMPRETRAIN_VIT_RENAMES = ((r'^patch_embed\.projection\.', 'patch_embed.proj.'), (r'^layers\.', 'blocks.'),
                           (r'\.ln1\.', '.norm1.'), (r'\.ln2\.', '.norm2.'), (r'\.ffn\.layers\.0\.0\.', '.mlp.fc1.'),
                           (r'\.ffn\.layers\.1\.', '.mlp.fc2.'), (r'^ln1\.', 'norm.'),
                           (r'\.attn\.attn\.in_proj_weight$', '.attn.qkv.weight'),
                           (r'\.attn\.attn\.in_proj_bias$', '.attn.qkv.bias'),
                           (r'\.attn\.attn\.out_proj\.', '.attn.proj.'))


def detect_layout(state_dict: StateDict) -> str:
    """One of ``'classifier'`` (ours, full model), ``'mmpretrain_vit'``, ``'official'`` or ``'backbone'`` (ours)."""
    keys = list(state_dict)
    if any(k.startswith('backbone.') for k in keys):
        return 'classifier'
    if any(k.startswith('layers.0.') for k in keys) and any('.ffn.layers.' in k for k in keys):
        return 'mmpretrain_vit'
    if any(k.startswith('score_predictors.') for k in keys):
        return 'backbone'
    if any(k.startswith('score_predictor.') for k in keys) or any(k.startswith(_OFFICIAL_HEAD_PREFIXES) for k in keys):
        return 'official'
    # ours, or a headless official / timm checkpoint (exactly our backbone names); anything else is refused by the
    # fit check, which names the keys
    return 'backbone'


def _rename_predictor(key: str) -> str:
    match = re.match(r'^score_predictor\.(\d+)\.(.*)$', key)
    if not match:
        return key
    rest = match.group(2)
    for old, new in _PREDICTOR_RENAMES:
        if rest.startswith(old):
            rest = new + rest[len(old):]
            break
    return f'score_predictors.{match.group(1)}.{rest}'


def split_official(state_dict: StateDict) -> Tuple[StateDict, StateDict]:
    """Official / timm layout -> (backbone keys in our names, head keys in the official names)."""
    backbone, head = {}, {}
    for key, value in state_dict.items():
        if key.startswith(_OFFICIAL_HEAD_PREFIXES):
            head[key] = value
        else:
            backbone[_rename_predictor(key)] = value
    return backbone, head


def mmpretrain_vit_to_backbone(state_dict: StateDict) -> StateDict:
    out = {}
    for key, value in state_dict.items():
        for pattern, repl in _MMPRETRAIN_VIT_RENAMES:
            key = re.sub(pattern, repl, key)
        out[key] = value
    return out


def to_backbone_state_dict(state_dict: StateDict) -> StateDict:
    """Any supported layout -> :class:`DynamicViT` backbone keys (classifier heads are left out)."""
    layout = detect_layout(state_dict)
    if layout == 'classifier':
        state_dict = {k[len('backbone.'):]: v for k, v in state_dict.items() if k.startswith('backbone.')}
        return to_backbone_state_dict(state_dict)
    if layout == 'mmpretrain_vit':
        return mmpretrain_vit_to_backbone(state_dict)
    if layout == 'official':
        return split_official(state_dict)[0]
    return dict(state_dict)


def infer_backbone_kwargs(state_dict: StateDict, num_heads: Optional[int] = None) -> Tuple[dict, List[str]]:
    """:class:`DynamicViT` keyword arguments (``arch``, ``patch_size``, ``img_size``) read off a checkpoint's shapes.

    ``arch`` is a zoo name when the shapes match one (and ``num_heads``, if given, agrees), else a custom dict.
    Checkpoints do not store the head count: give ``num_heads`` for a width outside the zoo; without it 64
    channels per head (the ViT convention) are assumed, and the returned notes say so.
    Returns ``(kwargs, notes)``.
    """
    backbone = to_backbone_state_dict(state_dict)
    try:
        embed_dims = backbone['cls_token'].shape[-1]
        num_layers = 1 + max(int(k.split('.')[1]) for k in backbone if k.startswith('blocks.'))
        hidden = backbone['blocks.0.mlp.fc1.weight'].shape[0]
        conv_stem = 'patch_embed.conv1.weight' in backbone
        patch_size = backbone['patch_embed.proj.weight'].shape[-1] * (2 if conv_stem else 1)
        grid = round((backbone['pos_embed'].shape[1] - 1) ** 0.5)
    except (KeyError, ValueError) as error:
        raise CheckpointMismatchError(f'cannot read the ViT arch off this checkpoint: missing {error}') from error
    arch = dict(embed_dims=embed_dims, num_layers=num_layers, mlp_ratio=hidden / embed_dims,
                qkv_bias='blocks.0.attn.qkv.bias' in backbone, stem='conv' if conv_stem else 'patch',
                residual_scale=2.0 if conv_stem else 1.0)
    from ..models.backbones.dynamic_vit import DynamicViT
    notes = []
    for name, settings in DynamicViT.arch_zoo.items():
        full = {**DynamicViT.arch_defaults, **settings}
        if all(full[k] == v for k, v in arch.items()) and num_heads in (None, full['num_heads']):
            arch = name
            break
    else:
        if num_heads is None:
            num_heads = max(1, embed_dims // 64)
            notes.append(f'num_heads={num_heads} was inferred from the width {embed_dims} (64 channels per head): '
                         'checkpoints do not record the head count, and this width is not in the official arch '
                         'table; pass --num-heads if the model was trained with another')
        if embed_dims % num_heads:
            raise ValueError(f'num_heads={num_heads} does not divide the width {embed_dims}')
        arch['num_heads'] = num_heads
    return dict(arch=arch, patch_size=patch_size, img_size=grid * patch_size), notes
