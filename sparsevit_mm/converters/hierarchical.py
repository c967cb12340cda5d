"""Checkpoint layouts of ConvNeXt / Swin (and their official dynamic versions) -> our backbones' keys.

Our ``DynamicConvNeXt`` uses mmpretrain's ConvNeXt names and our ``DynamicSwinTransformer`` mmdet's Swin names, so
checkpoints trained with mmpretrain / mmdet / mmseg load as they are (``backbone.`` prefixes are stripped). The
official ConvNeXt / Swin ImageNet checkpoints and the official DynamicCNN / DynamicSwin checkpoints are renamed
here; for the Swin base keys we use mmdet's own ``swin_converter`` (it also reorders the patch-merging channels).
"""
import re
from typing import Dict, Sequence

import torch

StateDict = Dict[str, torch.Tensor]

_HEAD_PREFIXES = ('head.', 'neck.', 'data_preprocessor.')


def strip_model_prefix(state_dict: StateDict) -> StateDict:
    """A full detector / segmentor / classifier checkpoint -> its ``backbone.*`` part, prefix removed."""
    if any(k.startswith('backbone.') for k in state_dict):
        return {k[len('backbone.'):]: v for k, v in state_dict.items() if k.startswith('backbone.')}
    return dict(state_dict)


def _predictor_key(rest: str) -> str:
    """Official predictor sub-key (``in_conv.0.weight`` ...) -> ours (``norm.weight`` ...)."""
    for old, new in (('in_conv.0.', 'norm.'), ('in_conv.1.', 'in_proj.'), ('out_conv.0.', 'classifier.0.'),
                     ('out_conv.2.', 'classifier.2.'), ('out_conv.4.', 'classifier.4.')):
        if rest.startswith(old):
            return new + rest[len(old):]
    return rest


def _linear_weight(value: torch.Tensor) -> torch.Tensor:
    """A 1x1 convolution weight (C_out, C_in, 1, 1) as a Linear weight (C_out, C_in)."""
    return value.flatten(1) if value.dim() == 4 else value


def convnext_to_backbone(state_dict: StateDict, out_indices: Sequence[int] = (3, )) -> StateDict:
    """mmpretrain / official ConvNeXt or official DynamicCNN keys -> :class:`DynamicConvNeXt` keys."""
    state_dict = strip_model_prefix(state_dict)
    official = any('.dwconv.' in k or k.startswith('score_predictor.') for k in state_dict) or 'norm.weight' in state_dict
    if not official:
        return {k: v for k, v in state_dict.items() if not k.startswith(_HEAD_PREFIXES)}
    last = max(out_indices)
    out = {}
    for key, value in state_dict.items():
        if key.startswith(_HEAD_PREFIXES):
            continue
        match = re.match(r'^score_predictor\.(\d+)\.(.*)$', key)
        if match:
            new = f'score_predictors.{match.group(1)}.{_predictor_key(match.group(2))}'
            out[new] = _linear_weight(value) if new.endswith('weight') else value
            continue
        if key.startswith('norm.'):
            out[f'norm{last}.' + key[len('norm.'):]] = value  # the classifier's final norm
            continue
        key = key.replace('.dwconv.', '.depthwise_conv.').replace('.pwconv1.', '.pointwise_conv1.')
        out[key.replace('.pwconv2.', '.pointwise_conv2.')] = value
    return out


def swin_to_backbone(state_dict: StateDict, out_indices: Sequence[int] = (3, )) -> StateDict:
    """mmdet / mmpretrain / official Swin or official DynamicSwin keys -> :class:`DynamicSwinTransformer` keys."""
    state_dict = strip_model_prefix(state_dict)
    if not any(k.startswith('layers.') for k in state_dict):
        return {k: v for k, v in state_dict.items() if not k.startswith(_HEAD_PREFIXES)}
    from mmdet.models.backbones.swin import swin_converter
    last = max(out_indices)
    base, extra = {}, {}
    for key, value in state_dict.items():
        if key.startswith('head.') or key.endswith('attn_mask'):
            continue  # shift masks are rebuilt for every input size
        fast = re.match(r'^layers\.(\d+)\.blocks\.(\d+)\.fastmlp\.fc1\.(\d)\.(.*)$', key)
        predictor = re.match(r'^layers\.(\d+)\.score_predictor\.(\d+)\.(.*)$', key)
        if fast:
            stage, block, index, param = fast.groups()
            extra[f'stages.{stage}.blocks.{block}.fast_path.{index}.{param}'] = value
        elif predictor:
            extra[f'score_predictors.{predictor.group(2)}.{_predictor_key(predictor.group(3))}'] = value
        elif key.startswith('norm.'):
            extra[f'norm{last}.' + key[len('norm.'):]] = value
        else:
            base[key] = value
    converted = {k[len('backbone.'):]: v for k, v in swin_converter(base).items()}
    return {**converted, **extra}


def _zoo_name(zoo: dict, arch: dict):
    for name, settings in zoo.items():
        if all(list(settings[k]) == list(v) if isinstance(v, (list, tuple)) else settings[k] == v
               for k, v in arch.items()):
            return name
    return None


def infer_swin_kwargs(state_dict: StateDict) -> dict:
    """:class:`DynamicSwinTransformer` arguments read off an official Swin / DynamicSwin checkpoint's shapes."""
    from ..models.backbones import DynamicSwinTransformer
    depths = [1 + max(int(k.split('.')[3]) for k in state_dict if re.match(rf'^layers\.{i}\.blocks\.\d+\.', k))
              for i in range(4)]
    num_heads = [state_dict[f'layers.{i}.blocks.0.attn.relative_position_bias_table'].shape[1] for i in range(4)]
    window = (int(round(state_dict['layers.0.blocks.0.attn.relative_position_bias_table'].shape[0] ** 0.5)) + 1) // 2
    arch = dict(embed_dims=state_dict['patch_embed.proj.weight'].shape[0], depths=depths, num_heads=num_heads)
    name = _zoo_name({k: {f: v[f] for f in arch} for k, v in DynamicSwinTransformer.arch_zoo.items()}, arch)
    fast = sorted(int(k.split('.')[3]) for k in state_dict if re.match(r'^layers\.2\.blocks\.\d+\.fastmlp\.', k))
    kwargs = dict(arch=name or arch, window_size=window, patch_size=state_dict['patch_embed.proj.weight'].shape[-1])
    if name is None:
        stride = max(1, fast[0]) if fast else max(1, depths[2] // 6)
        kwargs['prune_layers'] = [stride * (s + 1) for s in range(3)]
    return kwargs


def infer_convnext_kwargs(state_dict: StateDict) -> dict:
    """:class:`DynamicConvNeXt` arguments read off an official ConvNeXt / DynamicCNN checkpoint's shapes."""
    from ..models.backbones import DynamicConvNeXt
    depths = [1 + max(int(k.split('.')[2]) for k in state_dict if re.match(rf'^stages\.{i}\.\d+\.', k))
              for i in range(4)]
    channels = [state_dict[f'stages.{i}.0.gamma'].shape[0] for i in range(4)]
    arch = dict(depths=depths, channels=channels)
    name = _zoo_name({k: {f: v[f] for f in arch} for k, v in DynamicConvNeXt.arch_zoo.items()}, arch)
    kwargs = dict(arch=name or arch)
    if name is None:
        stride = max(1, depths[2] // 9)
        kwargs['prune_layers'] = [stride * (s + 1) for s in range(3)]
    return kwargs
