"""Build a model from a config (and a checkpoint) for inference, analysis and visualisation tools; convert
official checkpoints.

:func:`infer_official_model` tells an official checkpoint's family and reads the model config it fits off its keys
and shapes; each family's layout conversion lives beside its model (the models call it from their
``convert_checkpoint``, see :class:`~sparsevit_mm.utils.CheckpointLayoutMixin`). ``tools/model_converters`` is the CLI.
"""
import json
from typing import List, Optional, Tuple, Union

import torch
import torch.nn as nn
from mmengine.config import Config, ConfigDict
from mmengine.registry import MODELS, DefaultScope, init_default_scope

from . import registry  # noqa: F401  (our classes in the frameworks' registries)
from .models.backbones.dynamic_convnext import infer_convnext_kwargs
from .models.backbones.dynamic_swin import infer_swin_kwargs
from .models.backbones.dynamic_vit import infer_backbone_kwargs
from .models.backbones.uvit import infer_uvit_network
from .models.classifiers.dvt import official_dvt_to_ours
from .utils.checkpoint import (StateDict, check_fit, convert_for_model, load_checkpoint_file, load_weights,
                               unwrap_state_dict)
from .utils.config import load_config


def init_model(config, checkpoint: Optional[str] = None, device: str = 'cpu',
               cfg_options: Optional[dict] = None) -> nn.Module:
    """The config's model in eval mode on ``device``; the distillation teacher is left out.

    ``checkpoint`` may be a training checkpoint of ours, an mmpretrain / mmdet / mmseg one, or an official one
    (converted on the fly); it must fit, except for the groups the model declares optional (e.g. the score
    predictors a dense checkpoint never had).
    """
    cfg = config if isinstance(config, Config) else load_config(config, cfg_options)
    if isinstance(config, Config) and cfg_options:
        cfg.merge_from_dict(cfg_options)
    init_default_scope(cfg.get('default_scope', 'mmpretrain'))
    model_cfg = runner_model_config(cfg)
    model_cfg.pop('teacher', None)
    model_cfg.pop('init_cfg', None)  # weights come from `checkpoint`, not from the training initialisation
    model = MODELS.build(model_cfg)
    if checkpoint is not None:
        load_weights(model, checkpoint)
    model.cfg = cfg
    return model.to(torch.device(device)).eval()


def runner_model_config(cfg: Config) -> ConfigDict:
    """A copy of ``cfg.model`` as mmengine's Runner builds it: a top-level ``data_preprocessor`` (mmpretrain's
    dataset bases put the normalisation and the class count there) fills in the model's."""
    model_cfg = cfg.model.copy()
    if cfg.get('data_preprocessor') is not None:
        model_cfg.setdefault('data_preprocessor', cfg.data_preprocessor)
    return model_cfg


def build_model(model_cfg: dict, scope: str = 'mmpretrain') -> nn.Module:
    """A model config -> the model, built in ``scope``'s registry (our classes are in every framework's)."""
    with DefaultScope.overwrite_default_scope(scope):
        return MODELS.build(ConfigDict(model_cfg))


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
        network, notes = infer_uvit_network(state_dict, num_heads)
        if arch is not None:
            network['arch'], notes = arch, []
        return dict(type='UViTDiffusion', network=network), notes
    if family == 'dvt':
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
        kwargs, notes = infer_backbone_kwargs(state_dict, num_heads)
        backbone = dict(type='DynamicViT', **kwargs)
        if 'aux_head.weight' in state_dict:  # LV-ViT's token-labeling head reads every token
            backbone['out_type'] = 'raw'
            head = dict(type='TokenLabelingClsHead', num_classes=num_classes)
        else:
            head = dict(type='VisionTransformerClsHead', num_classes=num_classes)
    elif family == 'swin':
        backbone = dict(type='DynamicSwinTransformer', out_indices=(3, ), pad_small_map=False,
                        **infer_swin_kwargs(state_dict))
        neck = dict(type='GlobalAveragePooling')
        head = dict(type='LinearClsHead', num_classes=num_classes)
    else:
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


def convert_official(checkpoint: Union[str, dict], num_heads: Optional[int] = None,
                     arch: Union[None, str, dict] = None) -> Tuple[StateDict, dict, List[str]]:
    """An official checkpoint (a path or a loaded one) of any family -> ``(state_dict, model_cfg, notes)``.

    ``model_cfg`` is the whole model the weights fit (read off the checkpoint, see :func:`infer_official_model`);
    the weights are converted by that model and checked against it: a checkpoint that does not fit raises
    :class:`~sparsevit_mm.utils.CheckpointMismatchError` naming the keys. Groups the model declares optional and
    the checkpoint lacks (a dense checkpoint's score predictors) stay absent from ``state_dict``. ``notes`` say what
    had to be guessed (e.g. a head count).
    """
    source = checkpoint if isinstance(checkpoint, str) else 'the checkpoint'
    if isinstance(checkpoint, str):
        checkpoint = load_checkpoint_file(checkpoint)
    state_dict = unwrap_state_dict(checkpoint)
    model_cfg, notes = infer_official_model(state_dict, checkpoint if isinstance(checkpoint, dict) else None,
                                            num_heads, arch)
    model = build_model(model_cfg)
    converted = convert_for_model(model, checkpoint)
    check_fit(model, converted, source)
    return converted, model_cfg, notes
