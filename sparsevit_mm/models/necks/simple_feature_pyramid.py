"""A multi-scale pyramid from one plain-ViT feature map (ViTDet's "simple feature pyramid").

Li et al., "Exploring Plain Vision Transformer Backbones for Object Detection", ECCV 2022.

A plain ViT such as DynamicViT gives a single stride-16 map. Instead of FPN's top-down path over a hierarchy, each
pyramid level is made from that last map alone: deconvolutions go up (strides 8, 4), max pooling goes down
(stride 32), and every level then gets a 1x1 and a 3x3 conv to ``out_channels``. mmdet 3.3 ships no such neck (its
ViTDet lives in the repository's ``projects/``, outside the installed package), hence this one.
"""
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmcv.cnn import ConvModule, build_activation_layer, build_norm_layer
from mmengine.model import BaseModule
from mmpretrain.models.utils import LayerNorm2d  # channel LayerNorm on (B, C, H, W) maps


class SimpleFeaturePyramid(BaseModule):
    """ViTDet's simple feature pyramid: strides 4, 8, 16, 32 (+ extra pooled levels) from one stride-16 map.

    Per scale factor (the input map is taken to be at stride 16):

    * 4.0 -> ConvTranspose2d(C, C/2, 2, 2) + norm + GELU + ConvTranspose2d(C/2, C/4, 2, 2)   (stride 4)
    * 2.0 -> ConvTranspose2d(C, C/2, 2, 2)                                                  (stride 8)
    * 1.0 -> identity                                                                       (stride 16)
    * 0.5 -> MaxPool2d(2)                                                                   (stride 32)

    each followed by a 1x1 conv + norm and a 3x3 conv + norm to ``out_channels`` (no activation, as ViTDet). Levels
    beyond ``len(scale_factors)`` (``num_outs=5``: stride 64, what mmdet's RPN anchors expect) max-pool the last
    level with kernel 1 and stride 2, exactly as mmdet's FPN does without extra convs.

    Args:
        in_channels: channels C of the backbone map (384 for DeiT-S, 768 for DeiT-B).
        out_channels: channels of every output level.
        scale_factors: the levels to build, from finest to coarsest; a subset of (4.0, 2.0, 1.0, 0.5).
        num_outs: number of outputs, at least ``len(scale_factors)``; the extra ones are pooled from the last.
        norm_cfg: norm after the convs and inside the 4x branch. ``type='LN2d'`` is channel LayerNorm on maps
            (ViTDet's choice; resolved here, so it works under any default scope); other types (``'GN'`` with
            ``num_groups``, ``'BN'``, ``'SyncBN'``...) go to mmcv's ``build_norm_layer``. None: no norm, convs get
            a bias.
        act_cfg: activation between the two deconvolutions of the 4x branch.
        init_cfg: mmengine init config; by default the convs keep ConvModule's Kaiming init.
    """
    SCALE_FACTORS = (4.0, 2.0, 1.0, 0.5)

    def __init__(self,
                 in_channels: int,
                 out_channels: int = 256,
                 scale_factors: Sequence[float] = (4.0, 2.0, 1.0, 0.5),
                 num_outs: int = 5,
                 norm_cfg: Optional[dict] = dict(type='LN2d', eps=1e-6),
                 act_cfg: dict = dict(type='GELU'),
                 init_cfg: Optional[Union[dict, List[dict]]] = None):
        super().__init__(init_cfg=init_cfg)
        self.scale_factors = self._check_scale_factors(scale_factors)
        for name, value in (('in_channels', in_channels), ('out_channels', out_channels)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f'{name} must be a positive int, got {value!r}')
        # the deconvolutions halve the channels once per 2x upsampling
        divisor = {4.0: 4, 2.0: 2}.get(self.scale_factors[0], 1)
        if in_channels % divisor:
            raise ValueError(f'in_channels={in_channels} must be divisible by {divisor} for scale factor '
                             f'{self.scale_factors[0]} (its deconvolutions halve the channels)')
        if not isinstance(num_outs, int) or num_outs < len(self.scale_factors):
            raise ValueError(f'num_outs must be an int >= len(scale_factors) = {len(self.scale_factors)}, '
                             f'got {num_outs!r}')
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.num_outs = num_outs
        self.norm_cfg = self._resolve_norm_cfg(norm_cfg)
        self.act_cfg = act_cfg

        self.resamplers = nn.ModuleList()
        self.lateral_convs = nn.ModuleList()
        self.output_convs = nn.ModuleList()
        for scale in self.scale_factors:
            resampler, channels = self._build_resampler(scale, in_channels)
            self.resamplers.append(resampler)
            self.lateral_convs.append(
                ConvModule(channels, out_channels, 1, norm_cfg=self.norm_cfg, act_cfg=None))
            self.output_convs.append(
                ConvModule(out_channels, out_channels, 3, padding=1, norm_cfg=self.norm_cfg, act_cfg=None))

    @classmethod
    def _check_scale_factors(cls, scale_factors: Sequence[float]) -> Tuple[float, ...]:
        if isinstance(scale_factors, (str, bytes)) or not isinstance(scale_factors, Sequence) \
                or len(scale_factors) == 0:
            raise ValueError(f'scale_factors must be a non-empty sequence drawn from {cls.SCALE_FACTORS}, '
                             f'got {scale_factors!r}')
        unknown = [s for s in scale_factors if s not in cls.SCALE_FACTORS]
        if unknown:
            raise ValueError(f'unknown scale factors {unknown} in {list(scale_factors)}; '
                             f'allowed: {cls.SCALE_FACTORS}')
        factors = tuple(float(s) for s in scale_factors)
        # mmdet's heads pair levels with strides in increasing order (anchor / RoI strides 4, 8, 16, 32, 64)
        if any(a <= b for a, b in zip(factors, factors[1:])):
            raise ValueError(f'scale_factors must be strictly decreasing (finest level first, no repeats), '
                             f'got {list(scale_factors)}')
        return factors

    @staticmethod
    def _resolve_norm_cfg(norm_cfg: Optional[dict]) -> Optional[dict]:
        if norm_cfg is None:
            return None
        if not isinstance(norm_cfg, dict) or 'type' not in norm_cfg:
            raise ValueError(f"norm_cfg must be None or a dict with a 'type' (e.g. dict(type='LN2d') or "
                             f"dict(type='GN', num_groups=32)), got {norm_cfg!r}")
        norm_cfg = dict(norm_cfg)
        if norm_cfg['type'] == 'LN2d':
            # 'LN2d' is registered by mmpretrain only, so mmcv would not find it under the mmdet / mmseg scopes;
            # mmcv's build_norm_layer also accepts the class itself.
            norm_cfg['type'] = LayerNorm2d
        return norm_cfg

    def _build_resampler(self, scale: float, channels: int) -> Tuple[nn.Module, int]:
        """The module taking the (B, C, H, W) input to ``scale`` times its resolution, and its output channels."""
        if scale == 4.0:
            layers = [nn.ConvTranspose2d(channels, channels // 2, 2, stride=2)]
            if self.norm_cfg is not None:
                layers.append(build_norm_layer(self.norm_cfg, channels // 2)[1])
            layers += [build_activation_layer(self.act_cfg),
                       nn.ConvTranspose2d(channels // 2, channels // 4, 2, stride=2)]
            return nn.Sequential(*layers), channels // 4
        if scale == 2.0:
            return nn.ConvTranspose2d(channels, channels // 2, 2, stride=2), channels // 2
        if scale == 1.0:
            return nn.Identity(), channels
        return nn.MaxPool2d(kernel_size=2, stride=2), channels

    def forward(self, inputs: Union[Sequence[torch.Tensor], torch.Tensor]) -> Tuple[torch.Tensor, ...]:
        """Backbone maps -> pyramid.

        Args:
            inputs: the backbone's one (B, C, H, W) map at stride 16, alone or in a tuple (a tuple of several is
                refused: the pyramid is built from one map, and which one is for the backbone's ``out_indices``).

        Returns:
            ``num_outs`` maps of shape (B, out_channels, H * s, W * s) for each scale factor s, then the extra
            levels, each half the previous size (rounded up): with the defaults strides 4, 8, 16, 32, 64.
        """
        if isinstance(inputs, torch.Tensor):
            feature = inputs
        else:
            if len(inputs) != 1:
                raise ValueError(f'SimpleFeaturePyramid builds the pyramid from one (B, C, H, W) map, got a tuple of '
                                 f'{len(inputs)}: set the backbone\'s out_indices to the one block whose map it '
                                 'should use (e.g. out_indices=(11, ) for 12 blocks, with out_type=\'featmap\')')
            feature = inputs[0]
        if feature.dim() != 4 or feature.shape[1] != self.in_channels:
            raise ValueError(f'SimpleFeaturePyramid expects a (B, {self.in_channels}, H, W) map, got shape '
                             f'{tuple(feature.shape)} (in_channels must match the backbone)')
        outs = []
        for resampler, lateral, output in zip(self.resamplers, self.lateral_convs, self.output_convs):
            outs.append(output(lateral(resampler(feature))))
        while len(outs) < self.num_outs:
            outs.append(F.max_pool2d(outs[-1], kernel_size=1, stride=2))
        return tuple(outs)
