"""Checkpoint layout conversions (one module per model family); ``tools/model_converters`` are their CLIs."""
from typing import Dict, Optional

import torch
import torch.nn as nn

from ..utils.checkpoint import CheckpointMismatchError

StateDict = Dict[str, torch.Tensor]


def adapt_state_dict(model: nn.Module, state_dict: StateDict) -> StateDict:
    """Convert a full-model checkpoint (official or ours) to ``model``'s keys, by the kind of its backbone.

    Models whose backbone is not one of ours get the state dict unchanged.
    """
    from ..models.backbones import DynamicConvNeXt, DynamicSwinTransformer, DynamicViT
    from ..models.classifiers import DVT
    from ..models.diffusion import UViTDiffusion
    if isinstance(model, UViTDiffusion):
        if any(k.startswith('in_blocks.') for k in state_dict):  # an official plain U-ViT state dict
            return {f'network.{k}': v for k, v in state_dict.items()}
        return state_dict
    if isinstance(model, DVT):
        if any(k.startswith('less_less_token.') for k in state_dict):
            from .dvt import official_dvt_to_ours
            return official_dvt_to_ours(state_dict)[0]
        return state_dict
    backbone = getattr(model, 'backbone', None)
    if isinstance(backbone, DynamicViT):
        from .dynamicvit import to_classifier_state_dict
        return to_classifier_state_dict(state_dict)
    if isinstance(backbone, (DynamicSwinTransformer, DynamicConvNeXt)):
        return hierarchical_to_classifier(state_dict, backbone)
    return state_dict


def hierarchical_to_classifier(state_dict: StateDict, backbone: nn.Module) -> StateDict:
    """Swin / ConvNeXt classifier checkpoint (ours, mmpretrain's or official) -> ``backbone.*`` + ``head.*`` keys.

    The official ``head`` Linear becomes mmpretrain's ``LinearClsHead`` (``head.fc``).
    """
    converted = {f'backbone.{k}': v for k, v in backbone.convert_checkpoint(state_dict).items()}
    if any(k.startswith('backbone.') for k in state_dict):
        rest = {k: v for k, v in state_dict.items() if not k.startswith('backbone.')}
    else:
        rest = {f'head.fc.{k[len("head."):]}': v for k, v in state_dict.items() if k.startswith('head.')}
    return {**converted, **rest}


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
    raise ValueError(f'not an official ViT / Swin / ConvNeXt checkpoint; first keys: {keys[:8]}')


def convert_official(state_dict: StateDict, checkpoint: Optional[dict] = None):
    """Official DynamicViT / DeiT / LV-ViT / DynamicSwin / Swin / DynamicCNN / ConvNeXt checkpoint -> ours.

    Returns ``(classifier_state_dict, backbone_config, head_config)``: our classifier keys (``backbone.*`` +
    ``head.*``), and the backbone / head configs they fit (for DVT: the whole model's config and None; pass the
    whole official ``checkpoint`` so its exit costs and threshold table come along). The conversion is checked by loading the backbone part
    into that backbone (a checkpoint that does not fit raises naming its keys).
    """
    from ..models.backbones import DynamicConvNeXt, DynamicSwinTransformer, DynamicViT
    family = detect_family(state_dict)
    if family == 'uvit':
        from ..models.backbones import UViT
        from .uvit import official_uvit_to_ours
        converted, network = official_uvit_to_ours(state_dict)
        try:
            UViT(**{k: v for k, v in network.items() if k != 'type'}).load_state_dict(
                {k[len('network.'):]: v for k, v in converted.items()})
        except RuntimeError as error:
            raise CheckpointMismatchError(f'the U-ViT checkpoint does not fit: {error}') from error
        return converted, dict(type='UViTDiffusion', network=network), None
    if family == 'dvt':
        from ..models.classifiers import DVT
        from .dvt import official_dvt_to_ours
        converted, arch = official_dvt_to_ours(checkpoint if checkpoint is not None else state_dict)
        num_classes = converted['heads.0.weight'].shape[0]
        try:  # strict; DVT sizes its threshold-table buffers from the checkpoint while loading
            DVT(arch=arch, num_classes=num_classes).load_state_dict(converted)
        except RuntimeError as error:
            raise CheckpointMismatchError(f'the DVT checkpoint does not fit: {error}') from error
        return converted, dict(type='DVT', arch=arch, num_classes=num_classes), None
    if family == 'vit':
        from .dynamicvit import infer_backbone_kwargs, official_to_classifier
        kwargs = dict(type='DynamicViT', **infer_backbone_kwargs(state_dict))
        converted = official_to_classifier(state_dict)
        backbone = DynamicViT(**{k: v for k, v in kwargs.items() if k != 'type'}, keep_ratio=1.0)
        if 'head.token_fc.weight' in converted:
            kwargs['out_type'] = 'raw'
            head = dict(type='TokenLabelingClsHead', num_classes=converted['head.cls_fc.weight'].shape[0])
        else:
            head = dict(type='VisionTransformerClsHead', num_classes=converted['head.layers.head.weight'].shape[0])
    else:
        from .hierarchical import infer_convnext_kwargs, infer_swin_kwargs
        if family == 'swin':
            kwargs = dict(type='DynamicSwinTransformer', out_indices=(3, ), pad_small_map=False,
                          **infer_swin_kwargs(state_dict))
            backbone = DynamicSwinTransformer(**{k: v for k, v in kwargs.items() if k != 'type'}, keep_ratio=1.0)
        else:
            kwargs = dict(type='DynamicConvNeXt', **infer_convnext_kwargs(state_dict))
            backbone = DynamicConvNeXt(**{k: v for k, v in kwargs.items() if k != 'type'}, keep_ratio=1.0)
        converted = hierarchical_to_classifier(state_dict, backbone)
        head = dict(type='LinearClsHead', num_classes=converted['head.fc.weight'].shape[0])
    backbone.load_checked({k[len('backbone.'):]: v for k, v in converted.items() if k.startswith('backbone.')})
    head['in_channels'] = int(next(v for k, v in converted.items() if k.startswith('head.') and
                                   k.endswith('weight')).shape[1])
    return converted, kwargs, head
