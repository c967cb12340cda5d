"""Checkpoint layout conversions (one module per model family); ``tools/model_converters`` are their CLIs.

The models call these from their ``convert_checkpoint`` (see :class:`~sparsevit_mm.utils.CheckpointLayoutMixin`);
:func:`infer_official_model` reads the model config an official checkpoint fits off its keys and shapes.
"""
import json
from typing import Dict, List, Optional, Tuple, Union

import torch

StateDict = Dict[str, torch.Tensor]


def detect_family(state_dict: StateDict) -> str:
    """``'vit'``, ``'swin'``, ``'convnext'``, ``'dvt'`` or ``'uvit'``: the family of an official checkpoint."""
    keys = list(state_dict)
    if any(k.startswith(('less_less_token.', 'module.less_less_token.')) for k in keys):
        return 'dvt'
    if any(k.startswith('in_blocks.') for k in keys) and any(k.startswith('mid_block.') for k in keys):
        return 'uvit'
    if any(k.startswith('layers.') and '.attn.' in k for k in keys):
        return 'swin'
    if any(k.startswith('downsample_layers.') for k in keys):
        return 'convnext'
    if 'cls_token' in state_dict or any(k.startswith('blocks.0.') for k in keys):
        return 'vit'
    raise ValueError('not an official DynamicViT / DeiT / LV-ViT / Swin / ConvNeXt / DVT / U-ViT checkpoint; '
                     f'first keys: {keys[:8]}')


def _arch_override(arch: Union[None, str, dict]):
    """``--arch`` as given on a command line: a zoo name, a JSON dict, or already a dict."""
    if isinstance(arch, str) and arch.lstrip().startswith('{'):
        try:
            return json.loads(arch)
        except json.JSONDecodeError as error:
            raise ValueError(f'--arch {arch!r} is neither an arch name nor a JSON dict: {error}') from None
    return arch


def infer_official_model(state_dict: StateDict, checkpoint: Optional[dict] = None, num_heads: Optional[int] = None,
                         arch: Union[None, str, dict] = None) -> Tuple[dict, List[str]]:
    """The whole-model config an official checkpoint fits, read off its keys and shapes, and notes on guesses.

    Classifiers become mmpretrain ``ImageClassifier`` configs with our backbone (at ``keep_ratio=1.0`` for a dense
    checkpoint, 0.7 for one with score predictors) and the head the official one maps to; DVT a ``DVT`` config;
    U-ViT a ``UViTDiffusion`` config. What a checkpoint cannot record is taken from the arguments: ``num_heads``
    (ViT and U-ViT checkpoints store no head count; without it a width outside the official tables gets 64
    channels per head, and the notes say so) and ``arch`` (a zoo name or dict replacing the inferred one).
    """
    family = detect_family(state_dict)
    arch = _arch_override(arch)
    if num_heads is not None and family not in ('vit', 'uvit'):
        raise ValueError(f'--num-heads applies to ViT and U-ViT checkpoints; a {family} checkpoint records its head '
                         'count (give --arch to change the architecture)')
    if num_heads is not None and num_heads < 1:
        raise ValueError(f'num_heads must be >= 1, got {num_heads}')
    if family == 'uvit':
        from .uvit import infer_uvit_network
        network, notes = infer_uvit_network(state_dict, num_heads)
        if arch is not None:
            network['arch'], notes = arch, []
        return dict(type='UViTDiffusion', network=network), notes
    if family == 'dvt':
        from .dvt import official_dvt_to_ours
        converted, inferred = official_dvt_to_ours(checkpoint if checkpoint is not None else state_dict)
        return dict(type='DVT', arch=arch or inferred, num_classes=int(converted['heads.0.weight'].shape[0])), []
    dynamic = any(k.startswith(('score_predictor.', 'score_predictors.')) or '.score_predictor.' in k
                  for k in state_dict)
    keep_ratio = 0.7 if dynamic else 1.0
    num_classes = int(state_dict['head.weight'].shape[0]) if 'head.weight' in state_dict else None
    if num_classes is None:
        raise ValueError('this checkpoint has no classification head (head.weight); load it as a backbone with '
                         "init_cfg=dict(type='Pretrained', checkpoint=...) instead of converting it to a classifier")
    notes = []
    neck = None
    if family == 'vit':
        from .dynamicvit import infer_backbone_kwargs
        kwargs, notes = infer_backbone_kwargs(state_dict, num_heads)
        backbone = dict(type='DynamicViT', **kwargs)
        if 'aux_head.weight' in state_dict:  # LV-ViT's token-labeling head reads every token
            backbone['out_type'] = 'raw'
            head = dict(type='TokenLabelingClsHead', num_classes=num_classes)
        else:
            head = dict(type='VisionTransformerClsHead', num_classes=num_classes)
    elif family == 'swin':
        from .hierarchical import infer_swin_kwargs
        backbone = dict(type='DynamicSwinTransformer', out_indices=(3, ), pad_small_map=False,
                        **infer_swin_kwargs(state_dict))
        neck = dict(type='GlobalAveragePooling')
        head = dict(type='LinearClsHead', num_classes=num_classes)
    else:
        from .hierarchical import infer_convnext_kwargs
        backbone = dict(type='DynamicConvNeXt', **infer_convnext_kwargs(state_dict))
        head = dict(type='LinearClsHead', num_classes=num_classes)
    if arch is not None:
        backbone['arch'], notes = arch, []
    backbone['keep_ratio'] = keep_ratio
    head['in_channels'] = int(state_dict['head.weight'].shape[1])
    model = dict(type='ImageClassifier', backbone=backbone, head=head)
    if neck is not None:
        model['neck'] = neck
    return model, notes
