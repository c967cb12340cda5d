"""DynamicConvNeXt: ConvNeXt whose deep stage spends its MLP only where it matters (fast / slow paths).

Rao et al., "Dynamic Spatial Sparsification for Efficient Vision Transformers and Convolutional Neural Networks",
T-PAMI 2023 ("DynamicCNN").

Only stage 3 (index 2) is sparse. Score predictors run before ``prune_layers`` of that stage; predictor ``s`` sends
the best ``keep_ratio - 0.2 * s`` of the positions through the block's own pointwise MLP (slow path) and the rest
through a LayerNorm + Linear (fast path); the 7x7 depthwise convolution always sees the whole map, so every stage
still yields a complete feature map for FPN / UperNet. Built on mmpretrain's ``ConvNeXt`` (same parameter names,
so its checkpoints and mmdet / mmseg layer-decay recipes apply unchanged); ``keep_ratio=1.0`` is exactly it.
The official ConvNeXt / DynamicCNN layouts are converted by the functions at the end of this file
(:func:`convnext_to_backbone`, :func:`infer_convnext_kwargs`).
"""
import re
from typing import Dict, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint as cp
from mmpretrain.models.backbones.convnext import ConvNeXt, ConvNeXtBlock
from mmpretrain.models.utils import LayerNorm2d

from ...layers import (SlowFastRouting, TokenScorePredictor, check_prune_layers, default_prune_layers,
                       official_predictor_key)
from ...utils.arch import check_int
from ...utils.checkpoint import StateDict
from .base import _HEAD_PREFIXES, SparseBackbone, TokenSparsityResult, _zoo_name, strip_model_prefix


class DynamicConvNeXtBlock(ConvNeXtBlock):
    """ConvNeXt block with a fast path next to its pointwise MLP. (B, C, H, W) -> (B, C, H, W).

    Slow path: the block's ``norm -> pointwise_conv1 -> act -> pointwise_conv2 -> gamma``; fast path:
    ``fast_path`` (LayerNorm + Linear) scaled by ``fast_path_gamma``, initialised to 1e-6 whatever the layer-scale
    init, so that a fast path added to a pretrained dense ConvNeXt starts as a near no-op.
    Without routing it is exactly the ConvNeXt block. With inference routing and autograd off, a channels-last
    ``x`` is updated in place.
    """
    # the submodules the slow path runs (what routing spares on fast-path positions), for timing breakdowns; its
    # LayerNorm is functional on routed rows, so it is not among them
    slow_path_modules = ('pointwise_conv1', 'act', 'pointwise_conv2')

    def __init__(self, in_channels: int, layer_scale_init_value: float = 1e-6, **kwargs):
        super().__init__(in_channels, layer_scale_init_value=layer_scale_init_value, **kwargs)
        if not self.linear_pw_conv or self.grn is not None:
            raise ValueError('DynamicConvNeXtBlock routes positions as tokens: it needs linear_pw_conv=True and no '
                             'GRN (ConvNeXt V2 normalises over the whole map)')
        self.fast_path = nn.Sequential(nn.LayerNorm(in_channels, eps=1e-6), nn.Linear(in_channels, in_channels))
        self.fast_path_gamma = nn.Parameter(torch.full((in_channels, ), 1e-6))

    def slow_path(self, tokens: torch.Tensor) -> torch.Tensor:
        # The block's LayerNorm2d only takes 4-d maps; on tokens it is a plain channel LayerNorm.
        x = F.layer_norm(tokens, tokens.shape[-1:], self.norm.weight, self.norm.bias, self.norm.eps)
        x = self.pointwise_conv2(self.act(self.pointwise_conv1(x)))
        return x * self.gamma if self.gamma is not None else x

    def scaled_fast_path(self, tokens: torch.Tensor) -> torch.Tensor:
        """The fast path with its own layer scale (ConvNeXt's; Swin's fast path has none)."""
        return self.fast_path(tokens) * self.fast_path_gamma

    def forward(self, x: torch.Tensor, routing: Optional[SlowFastRouting] = None) -> torch.Tensor:
        if routing is None:
            return super().forward(x)

        def inner(x):
            batch, channels, height, width = x.shape
            # (B, N, C) views of channels-last maps (the whole network runs channels-last): no transposing copies
            tokens = self.depthwise_conv(x).permute(0, 2, 3, 1).reshape(batch, height * width, channels)
            residual = x.permute(0, 2, 3, 1).reshape(batch, height * width, channels)
            x = routing.residual_update(residual, tokens, self.slow_path, self.scaled_fast_path, self.drop_path)
            return x.view(batch, height, width, channels).permute(0, 3, 1, 2)

        if self.with_cp and x.requires_grad:
            return cp.checkpoint(inner, x, use_reentrant=False)
        return inner(x)


class DynamicConvNeXt(SparseBackbone, ConvNeXt):
    """DynamicConvNeXt backbone for mmpretrain, mmdet and mmseg.

    It takes mmpretrain's ``ConvNeXt`` arguments, so an upstream config (mmpretrain's, or mmdet's / mmseg's
    ``type='mmpretrain.ConvNeXt'``) changes by ``type=`` (and ``keep_ratio``) alone; the ones the routing cannot keep
    (``use_grn=True``, ``linear_pw_conv=False``, a norm other than ``LN2d``) are refused.

    Args:
        arch: ``'tiny'``, ``'small'``, ``'base'``, any other mmpretrain ConvNeXt size (``'atto'`` ... ``'xlarge'``,
            predictors evenly spaced in stage 3), or a dict with ``depths``, ``channels`` (and optionally
            ``prune_layers``).
        stem_patch_size / norm_cfg / act_cfg / linear_pw_conv / use_grn: as mmpretrain's ``ConvNeXt``.
        keep_ratio: base ratio r: predictor s sends ``r - 0.2 * s`` of the stage-3 positions to the slow path
            (0.7 -> 0.7 / 0.5 / 0.3); or one ratio per predictor. 1.0 makes the network dense.
        prune_layers: stage-3 blocks with a predictor in front (tiny: 1, 2, 3; small / base: 3, 6, 9).
        out_indices / gap_before_final_norm / frozen_stages / drop_path_rate / layer_scale_init_value / with_cp:
            as mmpretrain's ``ConvNeXt`` (classification: ``out_indices=-1`` with GAP; dense tasks:
            ``out_indices=(0, 1, 2, 3)``, ``gap_before_final_norm=False``).
        norm_eval: keep BatchNorm layers in eval mode (ConvNeXt has none; accepted for mmdet / mmseg configs).
        init_cfg: ``dict(type='Pretrained', checkpoint=..., prefix=...)`` loads mmpretrain, official ConvNeXt or
            official DynamicCNN checkpoints (converted on the fly; missing keys are an error).
    """
    arch_zoo: Dict[str, dict] = {
        'tiny': dict(depths=[3, 3, 9, 3], channels=[96, 192, 384, 768], prune_layers=[1, 2, 3]),
        'small': dict(depths=[3, 3, 27, 3], channels=[96, 192, 384, 768], prune_layers=[3, 6, 9]),
        'base': dict(depths=[3, 3, 27, 3], channels=[128, 256, 512, 1024], prune_layers=[3, 6, 9]),
    }
    sparse_stage = 2
    keep_ratio_schedule = 'linear'
    # Modules a dense ImageNet ConvNeXt checkpoint lacks: predictors, fast paths, and the extra output norms.
    optional_checkpoint_groups = (r'^score_predictors\.', r'\.fast_path(_gamma)?(\.|$)', r'^norm[0-2]\.')
    default_keep_ratio_weight = 10.0
    default_init_cfg = (dict(type='TruncNormal', layer=['Conv2d', 'Linear'], std=.02, bias=0.),
                        dict(type='Constant', layer=['LayerNorm'], val=1., bias=0.))

    def __init__(self,
                 arch: Union[str, dict] = 'tiny',
                 keep_ratio: Union[float, Sequence[float]] = 0.7,
                 prune_layers: Optional[Sequence[int]] = None,
                 in_channels: int = 3,
                 stem_patch_size: int = 4,
                 norm_cfg: dict = dict(type='LN2d', eps=1e-6),
                 act_cfg: dict = dict(type='GELU'),
                 linear_pw_conv: bool = True,
                 use_grn: bool = False,
                 drop_path_rate: float = 0.0,
                 layer_scale_init_value: float = 1e-6,
                 out_indices: Union[int, Sequence[int]] = -1,
                 frozen_stages: int = 0,
                 gap_before_final_norm: bool = True,
                 norm_eval: bool = False,
                 with_cp: bool = False,
                 init_cfg: Optional[Union[dict, list]] = None):
        if isinstance(arch, str) and arch.lower() not in self.arch_zoo:
            if arch.lower() not in ConvNeXt.arch_settings:
                raise ValueError(f'unknown arch {arch!r} for DynamicConvNeXt; choose one of '
                                 f'{sorted({*self.arch_zoo, *ConvNeXt.arch_settings})} or a dict with depths and '
                                 'channels')
            arch = dict(ConvNeXt.arch_settings[arch.lower()])  # mmpretrain's other sizes (atto ... huge)
        settings = self.resolve_arch(arch, required=('depths', 'channels'))
        depths = list(settings['depths'])
        if len(depths) != 4:
            raise ValueError(f'DynamicConvNeXt needs 4 stages, got depths {depths}')
        check_int(frozen_stages, 'frozen_stages', 0, len(depths), '0 freezes nothing, k the first k stages')
        # Positions are routed as tokens through a channel LayerNorm and Linear layers: GRN (ConvNeXt V2) normalises
        # over the whole map, and 1x1 convolutions / other norms would not be the same function on a subset.
        if use_grn:
            raise ValueError('use_grn=True (ConvNeXt V2) is not supported: GRN normalises over every position, '
                             'which the slow / fast routing of positions cannot keep')
        if not linear_pw_conv:
            raise ValueError('linear_pw_conv=False is not supported: the routed MLP runs positions as tokens '
                             'through Linear layers (the same weights as 1x1 convolutions: convert them instead)')
        if dict(norm_cfg).get('type') != 'LN2d':
            raise ValueError(f"norm_cfg must be dict(type='LN2d', eps=...) (ConvNeXt's LayerNorm), got {norm_cfg}")
        super().__init__(arch=dict(depths=depths, channels=list(settings['channels'])), in_channels=in_channels,
                         stem_patch_size=stem_patch_size, norm_cfg=norm_cfg, act_cfg=act_cfg,
                         drop_path_rate=drop_path_rate, layer_scale_init_value=layer_scale_init_value,
                         out_indices=list(self.resolve_out_indices(out_indices, 4)), frozen_stages=frozen_stages,
                         gap_before_final_norm=gap_before_final_norm, with_cp=with_cp,
                         init_cfg=init_cfg)
        self.arch_settings = settings
        self.norm_eval = norm_eval
        stage_depth = depths[self.sparse_stage]
        if prune_layers is None:
            prune_layers = settings.get('prune_layers', default_prune_layers(stage_depth))
        self.prune_layers = check_prune_layers(prune_layers, stage_depth)
        channels = self.channels[self.sparse_stage]
        stage = self.stages[self.sparse_stage]
        for j in range(self.prune_layers[0], stage_depth):
            dense = stage[j]
            drop = dense.drop_path.drop_prob if hasattr(dense.drop_path, 'drop_prob') else 0.0
            stage[j] = DynamicConvNeXtBlock(channels, norm_cfg=norm_cfg, act_cfg=act_cfg,
                                            layer_scale_init_value=layer_scale_init_value, drop_path_rate=drop,
                                            with_cp=with_cp)
        self.score_predictors = nn.ModuleList(TokenScorePredictor(channels, norm_eps=1e-6) for _ in self.prune_layers)
        self.keep_ratio = keep_ratio
        self._freeze_stages()

    # ------------------------------------------------------------------------------------------------ weights
    def convert_checkpoint(self, state_dict, checkpoint=None):
        return convnext_to_backbone(state_dict, self.out_indices)

    def _freeze_stages(self):
        ConvNeXt._freeze_stages(self)

    # ------------------------------------------------------------------------------------------------ forward
    def forward_sparse(self, images: torch.Tensor) -> TokenSparsityResult:
        if min(images.shape[-2:]) < 32:
            raise ValueError(f'input size {tuple(images.shape[-2:])} is smaller than 32, the total stride of '
                             'ConvNeXt; the last stage would be empty')
        result = TokenSparsityResult(outs=())
        outs = []
        # The whole network runs channels-last: the blocks' LayerNorm and pointwise MLP then read positions as
        # rows with no transposing copies (about 10% of a dense ConvNeXt-T pass on CPU), and the sparse stage
        # gathers and updates rows in place. Only the outputs are made contiguous (B, C, H, W).
        x = images.contiguous(memory_format=torch.channels_last)
        for i, stage in enumerate(self.stages):
            x = self._downsample(i, x)
            x = self._sparse_stage(x, result) if i == self.sparse_stage and self.prunes else stage(x)
            if i in self.out_indices:
                norm = getattr(self, f'norm{i}')
                if self.gap_before_final_norm:
                    outs.append(norm(x.mean([-2, -1], keepdim=True)).flatten(1))
                else:
                    outs.append(norm(x))
            if i == len(self.stages) - 1 and f'norm{i}' in self._modules:
                # Per-position normed final map: what feature distillation compares with the teacher.
                result.patch_tokens = getattr(self, f'norm{i}')(x).flatten(2).transpose(1, 2)
        result.outs = tuple(outs)
        return result

    def _downsample(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """mmpretrain's stem (conv, norm) / downsampling layer (norm, conv), keeping channels-last memory (its
        LayerNorm2d would return a contiguous (B, C, H, W) map)."""
        for layer in self.downsample_layers[index]:
            if isinstance(layer, LayerNorm2d):
                x = layer(x.permute(0, 2, 3, 1), data_format='channel_last').permute(0, 3, 1, 2)
            else:
                x = layer(x)
        return x

    def _sparse_stage(self, x: torch.Tensor, result: TokenSparsityResult) -> torch.Tensor:
        prune_at = {layer: s for s, layer in enumerate(self.prune_layers)}
        result.grid = tuple(x.shape[-2:])
        routing = None
        for j, block in enumerate(self.stages[self.sparse_stage]):
            if j in prune_at:
                routing = self.route(prune_at[j], x.permute(0, 2, 3, 1).flatten(1, 2), result)
            x = block(x, routing) if routing is not None else block(x)
        return x


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoint layouts: mmpretrain / official ConvNeXt and official DynamicCNN -> ours
#
# mmpretrain's ConvNeXt names are ours, so its (and mmdet's / mmseg's) checkpoints load as they are. The official
# ConvNeXt ImageNet checkpoints and the official DynamicCNN ones are renamed here.
# ---------------------------------------------------------------------------------------------------------------------

def _linear_weight(value: torch.Tensor) -> torch.Tensor:
    """A 1x1 convolution weight (C_out, C_in, 1, 1) as a Linear weight (C_out, C_in)."""
    return value.flatten(1) if value.dim() == 4 else value


def convnext_to_backbone(state_dict: StateDict, out_indices: Sequence[int] = (3, )) -> StateDict:
    """mmpretrain / official ConvNeXt or official DynamicCNN keys -> :class:`DynamicConvNeXt` keys."""
    state_dict = strip_model_prefix(state_dict)
    official = (any('.dwconv.' in k or k.startswith('score_predictor.') for k in state_dict)
                or 'norm.weight' in state_dict)
    if not official:
        return {k: v for k, v in state_dict.items() if not k.startswith(_HEAD_PREFIXES)}
    last = max(out_indices)
    out = {}
    for key, value in state_dict.items():
        if key.startswith(_HEAD_PREFIXES):
            continue
        match = re.match(r'^score_predictor\.(\d+)\.(.*)$', key)
        if match:
            new = f'score_predictors.{match.group(1)}.{official_predictor_key(match.group(2))}'
            out[new] = _linear_weight(value) if new.endswith('weight') else value
            continue
        if key.startswith('norm.'):
            out[f'norm{last}.' + key[len('norm.'):]] = value  # the classifier's final norm
            continue
        key = key.replace('.dwconv.', '.depthwise_conv.').replace('.pwconv1.', '.pointwise_conv1.')
        out[key.replace('.pwconv2.', '.pointwise_conv2.')] = value
    return out


def infer_convnext_kwargs(state_dict: StateDict) -> dict:
    """:class:`DynamicConvNeXt` arguments read off an official ConvNeXt / DynamicCNN checkpoint's shapes."""
    depths = [1 + max(int(k.split('.')[2]) for k in state_dict if re.match(rf'^stages\.{i}\.\d+\.', k))
              for i in range(4)]
    channels = [state_dict[f'stages.{i}.0.gamma'].shape[0] for i in range(4)]
    arch = dict(depths=depths, channels=channels)
    name = _zoo_name({k: {f: v[f] for f in arch} for k, v in DynamicConvNeXt.arch_zoo.items()}, arch)
    kwargs = dict(arch=name or arch)
    if name is None:  # what the model itself would choose: the one rule
        kwargs['prune_layers'] = default_prune_layers(depths[2])
    return kwargs
