"""DynamicSwinTransformer: Swin whose deep stage spends its MLP only where it matters (fast / slow paths).

Rao et al., "Dynamic Spatial Sparsification for Efficient Vision Transformers and Convolutional Neural Networks",
T-PAMI 2023 ("DynamicSwin").

Only stage 3 (index 2) is sparse. Score predictors run before ``prune_layers`` of that stage; predictor ``s`` sends
the best ``keep_ratio - 0.2 * s`` of the positions through the block's MLP (slow path) and the rest through a
LayerNorm + Linear (fast path). Shifted-window attention always runs over the whole map, so window structure,
padding and every stage's full feature map (for FPN / UperNet) stay intact. Built on mmdet's ``SwinTransformer``
(same module names: mmdet / mmseg / mmpretrain Swin checkpoints load as they are); ``keep_ratio=1.0`` is exactly it.
The official Swin / DynamicSwin layouts are converted by the functions at the end of this file
(:func:`swin_to_backbone`, :func:`infer_swin_kwargs`).
"""
import re
from typing import Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint as cp
from mmdet.models.backbones.swin import SwinBlock, SwinTransformer, swin_converter

from ...layers import (SlowFastRouting, TokenScorePredictor, check_prune_layers, default_prune_layers, flat_rows,
                       official_predictor_key)
from ...utils.arch import check_int
from ...utils.caching import eager_cache
from ...utils.checkpoint import StateDict
from .base import _HEAD_PREFIXES, SparseBackbone, TokenSparsityResult, _zoo_name, strip_model_prefix


class DynamicSwinBlock(SwinBlock):
    """mmdet's Swin block, optionally with a fast path next to its MLP. (B, N, C) tokens of an (H, W) map.

    Attention runs over every position; then the slow path is the block's ``norm2 -> ffn`` and the fast path
    ``fast_path`` (LayerNorm + Linear, no layer scale, as the official DynamicSwin). Without routing it computes
    exactly what mmdet's ``SwinBlock`` computes, with the same parameters (see :meth:`window_attention`).
    """
    # the submodules the slow path runs (what routing spares on fast-path positions), for timing breakdowns
    slow_path_modules = ('norm2', 'ffn.layers')

    def __init__(self, embed_dims: int, *args, with_fast_path: bool = False, **kwargs):
        super().__init__(embed_dims, *args, **kwargs)
        if with_fast_path:
            self.fast_path = nn.Sequential(nn.LayerNorm(embed_dims), nn.Linear(embed_dims, embed_dims))

    def slow_path(self, tokens: torch.Tensor) -> torch.Tensor:
        """The block's MLP branch without its residual: ``norm2 -> ffn``."""
        return self.ffn.gamma2(self.ffn.layers(self.norm2(tokens)))

    def window_attention(self, x: torch.Tensor, hw_shape, shift: bool = True) -> torch.Tensor:
        """(Shifted-)window attention of (B, N, C) normed tokens -> (B, N, C), before the residual.

        The maths of mmdet's ``ShiftWindowMSA`` (pad to window multiples, cyclic shift, relative position bias,
        -100 between regions the shift made adjacent), arranged for speed: one ``index_select`` takes the padded
        map into window order (shift and partition at once) and one takes it back, and the relative position bias
        and shift mask form the ``attn_mask`` of ``scaled_dot_product_attention``. ``shift=False`` skips the
        shift (the official Swin on maps no larger than a window).
        """
        msa, window = self.attn.w_msa, self.attn.window_size
        shift_size = self.attn.shift_size if shift else 0
        batch, _, channels = x.shape
        height, width = hw_shape
        padded_h, padded_w = -(-height // window) * window, -(-width // window) * window
        if (padded_h, padded_w) != (height, width):
            x = F.pad(x.view(batch, height, width, channels), (0, 0, 0, padded_w - width, 0, padded_h - height))
        order, inverse = window_order(padded_h, padded_w, window, shift_size, x.device)
        rows = flat_rows(order.expand(batch, -1), order.numel())
        windows = x.reshape(-1, channels).index_select(0, rows).view(-1, window * window, channels)

        num_heads, area = msa.num_heads, window * window
        qkv = msa.qkv(windows).view(windows.shape[0], area, 3, num_heads, channels // num_heads)
        query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B * nW, heads, area, head_dims)
        bias = msa.relative_position_bias_table[msa.relative_position_index.view(-1)]
        mask = bias.view(area, area, num_heads).permute(2, 0, 1).unsqueeze(0)  # (1, heads, area, area)
        if shift_size:
            mask = mask + shift_mask(padded_h, padded_w, window, shift_size, x.device).unsqueeze(1)
            mask = mask.unsqueeze(0).expand(batch, -1, -1, -1, -1).reshape(-1, num_heads, area, area)
        else:
            mask = mask.expand(windows.shape[0], -1, -1, -1)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask.to(query.dtype),
                                             dropout_p=msa.attn_drop.p if self.training else 0.0, scale=msa.scale)
        out = msa.proj_drop(msa.proj(out.transpose(1, 2).reshape(-1, channels)))

        back = flat_rows(inverse.expand(batch, -1), order.numel())
        out = out.index_select(0, back).view(batch, padded_h, padded_w, channels)
        if (padded_h, padded_w) != (height, width):
            out = out[:, :height, :width]
        return self.attn.drop(out.reshape(batch, height * width, channels))

    def forward(self, x: torch.Tensor, hw_shape, routing: Optional[SlowFastRouting] = None,
                shift: bool = True) -> torch.Tensor:

        def inner(x):
            x = x + self.window_attention(self.norm1(x), hw_shape, shift)
            if routing is None:
                return self.ffn(self.norm2(x), identity=x)
            return routing.residual_update(x, x, self.slow_path, self.fast_path, self.ffn.dropout_layer)

        if self.with_cp and x.requires_grad:
            return cp.checkpoint(inner, x, use_reentrant=False)
        return inner(x)


# Both layouts depend only on the map size, so they are built once per size (every block and pass reuses them).
@eager_cache(maxsize=64)
def window_order(height: int, width: int, window: int, shift: int, device) -> Tuple[torch.Tensor, torch.Tensor]:
    """Positions of an (H, W) map in window order: the windows of the map cyclically shifted by ``-shift``, each
    window's positions row by row -> (H * W, ) indices into the row-major map, and the inverse permutation."""
    grid = torch.arange(height * width, device=device).view(height, width)
    if shift:
        grid = grid.roll((-shift, -shift), (0, 1))
    order = grid.view(height // window, window, width // window, window).transpose(1, 2).flatten()
    return order, order.argsort()


@eager_cache(maxsize=64)
def shift_mask(height: int, width: int, window: int, shift: int, device) -> torch.Tensor:
    """(nW, area, area) additive mask of shifted windows: -100 between positions that came from different regions
    of the unshifted map (Swin's convention), 0 elsewhere."""
    region = torch.zeros(height, width, device=device)
    bounds = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    for i, rows in enumerate(bounds):
        for j, cols in enumerate(bounds):
            region[rows, cols] = 3 * i + j
    region = region.flatten()[window_order(height, width, window, 0, device)[0]].view(-1, window * window)
    different = region.unsqueeze(1) != region.unsqueeze(2)
    return different.float() * -100.0


class DynamicSwinTransformer(SparseBackbone, SwinTransformer):
    """DynamicSwin backbone for mmdet, mmseg and mmpretrain.

    It takes mmdet's / mmseg's ``SwinTransformer`` arguments, so an upstream config changes by ``type=`` (and
    ``keep_ratio``) alone; arguments that would change nothing are refused (``use_abs_pos_embed=True``).

    Args:
        arch: ``'tiny'``, ``'small'``, ``'base'`` or a dict with ``embed_dims``, ``depths``, ``num_heads`` (and
            optionally ``prune_layers``). Or give ``embed_dims`` / ``depths`` / ``num_heads`` as mmdet does (the
            missing ones take mmdet's defaults, Swin-T's); the default is ``'tiny'``.
        keep_ratio: base ratio r: predictor s sends ``r - 0.2 * s`` of the stage-3 positions to the slow path
            (0.7 -> 0.7 / 0.5 / 0.3); or one ratio per predictor. 1.0 makes the network dense.
        prune_layers: stage-3 blocks with a predictor in front (tiny: 1, 2, 3; small / base: 2, 4, 6).
        out_indices: stages whose (normed) maps are returned; (0, 1, 2, 3) for FPN / UperNet, (3, ) for
            classification.
        window_size / mlp_ratio / patch_size / strides / qkv_bias / qk_scale / patch_norm / drop_rate /
            attn_drop_rate / drop_path_rate / act_cfg / norm_cfg / frozen_stages / with_cp: as mmdet's
            ``SwinTransformer``. Any input size works (maps are padded to window multiples, as in mmdet); inputs
            smaller than one window raise an error.
        pretrain_img_size: as upstream, where it only sizes an absolute position embedding (which Swin configs
            leave off): accepted, changes nothing.
        convert_weights: mmdet's switch for official Swin checkpoints; here the layout is read off the checkpoint
            either way, so both values load official, mmdet and mmpretrain checkpoints.
        pretrained: deprecated (mmdet's): the same as ``init_cfg=dict(type='Pretrained', checkpoint=pretrained)``.
        pad_small_map: on a map no larger than one window, still shift (True: mmdet's Swin, for detection and
            segmentation) or not (False: the official Swin and mmpretrain's default, for classification at 224).
        norm_eval: keep BatchNorm layers in eval mode (Swin has none; accepted for mmdet / mmseg configs).
        init_cfg: ``dict(type='Pretrained', checkpoint=..., prefix=...)`` loads mmdet / mmseg / mmpretrain Swin,
            official Swin and official DynamicSwin checkpoints (converted on the fly; missing keys are an error).
    """
    arch_zoo: Dict[str, dict] = {
        'tiny': dict(embed_dims=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24], prune_layers=[1, 2, 3]),
        'small': dict(embed_dims=96, depths=[2, 2, 18, 2], num_heads=[3, 6, 12, 24], prune_layers=[2, 4, 6]),
        'base': dict(embed_dims=128, depths=[2, 2, 18, 2], num_heads=[4, 8, 16, 32], prune_layers=[2, 4, 6]),
    }
    sparse_stage = 2
    max_window_size = 32
    keep_ratio_schedule = 'linear'
    # Modules a dense Swin checkpoint lacks: predictors, fast paths, the extra output norms, position indices.
    optional_checkpoint_groups = (r'^score_predictors\.', r'\.fast_path\.', r'^norm[0-2]\.',
                                  r'relative_position_index$')
    default_keep_ratio_weight = 10.0
    # from scratch, as mmdet's Swin (the attention modules' own init_weights then give the relative-position tables
    # their truncated normal)
    default_init_cfg = (dict(type='TruncNormal', layer='Linear', std=.02, bias=0.),
                        dict(type='Constant', layer='LayerNorm', val=1., bias=0.))

    def __init__(self,
                 arch: Union[None, str, dict] = None,
                 keep_ratio: Union[float, Sequence[float]] = 0.7,
                 prune_layers: Optional[Sequence[int]] = None,
                 pretrain_img_size: Union[int, Sequence[int]] = 224,
                 in_channels: int = 3,
                 embed_dims: Optional[int] = None,
                 patch_size: int = 4,
                 window_size: int = 7,
                 mlp_ratio: int = 4,
                 depths: Optional[Sequence[int]] = None,
                 num_heads: Optional[Sequence[int]] = None,
                 strides: Optional[Sequence[int]] = None,
                 out_indices: Union[int, Sequence[int]] = (0, 1, 2, 3),
                 qkv_bias: bool = True,
                 qk_scale: Optional[float] = None,
                 patch_norm: bool = True,
                 drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.1,
                 use_abs_pos_embed: bool = False,
                 act_cfg: dict = dict(type='GELU'),
                 norm_cfg: dict = dict(type='LN'),
                 frozen_stages: int = -1,
                 pad_small_map: bool = True,
                 norm_eval: bool = False,
                 with_cp: bool = False,
                 convert_weights: bool = True,
                 pretrained: Optional[str] = None,
                 init_cfg: Optional[dict] = None):
        given = {k: v for k, v in dict(embed_dims=embed_dims, depths=depths, num_heads=num_heads).items()
                 if v is not None}
        if given and arch is not None:
            raise ValueError(f'give arch={arch!r} or {sorted(given)} (as mmdet / mmseg configs do), not both')
        if given:  # mmdet's / mmseg's SwinTransformer arguments, with their defaults
            arch = dict(dict(embed_dims=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24]), **given)
            arch = self._zoo_entry(arch) or arch
        settings = self.resolve_arch('tiny' if arch is None else arch, required=('embed_dims', 'depths', 'num_heads'))
        depths = list(settings['depths'])
        if len(depths) != 4 or len(settings['num_heads']) != 4:
            raise ValueError(f'DynamicSwinTransformer needs 4 stages, got depths {depths} and num_heads '
                             f'{list(settings["num_heads"])}')
        check_int(window_size, 'window_size', 1, self.max_window_size,
                  'each block holds a (window_size^2, window_size^2) relative-position index, 800 MB at 100; '
                  'Swin uses 7 or 12')
        check_int(frozen_stages, 'frozen_stages', -1, len(depths), '-1 freezes nothing, 0 the patch embedding, k '
                  'also the first k stages')
        if use_abs_pos_embed:
            raise ValueError('use_abs_pos_embed=True is not supported: DynamicSwin (like the official Swin) has no '
                             'absolute position embedding')
        if not isinstance(pretrain_img_size, (int, tuple, list)):
            raise TypeError(f'pretrain_img_size must be an int or a pair, got {pretrain_img_size!r}')
        if pretrained is not None:
            if init_cfg is not None:
                raise ValueError('give init_cfg or the deprecated pretrained, not both')
            if not isinstance(pretrained, str):
                raise TypeError(f'pretrained must be a checkpoint path, got {pretrained!r}')
            init_cfg = dict(type='Pretrained', checkpoint=pretrained)
        if not isinstance(convert_weights, bool):
            raise TypeError(f'convert_weights must be True or False, got {convert_weights!r}')
        strides = tuple(strides) if strides is not None else (patch_size, 2, 2, 2)
        super().__init__(pretrain_img_size=pretrain_img_size, in_channels=in_channels,
                         embed_dims=settings['embed_dims'], patch_size=patch_size, window_size=window_size,
                         mlp_ratio=mlp_ratio, depths=depths, num_heads=list(settings['num_heads']), strides=strides,
                         out_indices=tuple(self.resolve_out_indices(out_indices, 4)), qkv_bias=qkv_bias,
                         qk_scale=qk_scale, patch_norm=patch_norm, drop_rate=drop_rate,
                         attn_drop_rate=attn_drop_rate, drop_path_rate=drop_path_rate, act_cfg=act_cfg,
                         norm_cfg=norm_cfg, with_cp=with_cp, frozen_stages=frozen_stages, init_cfg=init_cfg)
        self.arch_settings = settings
        self.patch_size, self.window_size = patch_size, window_size
        self.norm_eval = norm_eval
        self.pad_small_map = pad_small_map
        stage_depth = depths[self.sparse_stage]
        if prune_layers is None:
            prune_layers = settings.get('prune_layers', default_prune_layers(stage_depth))
        self.prune_layers = check_prune_layers(prune_layers, stage_depth)
        # Our block class everywhere (same parameters as mmdet's); fast paths from the first pruned block on.
        for i, stage in enumerate(self.stages):
            for j, dense in enumerate(stage.blocks):
                channels = self.num_features[i]
                drop_path = dense.attn.drop.drop_prob if hasattr(dense.attn.drop, 'drop_prob') else 0.0
                stage.blocks[j] = DynamicSwinBlock(
                    channels, settings['num_heads'][i], mlp_ratio * channels, window_size, shift=j % 2 == 1,
                    qkv_bias=qkv_bias, qk_scale=qk_scale, drop_rate=drop_rate, attn_drop_rate=attn_drop_rate,
                    drop_path_rate=drop_path, act_cfg=act_cfg, norm_cfg=norm_cfg, with_cp=with_cp,
                    with_fast_path=i == self.sparse_stage and j >= self.prune_layers[0])
        channels = self.num_features[self.sparse_stage]
        self.score_predictors = nn.ModuleList(TokenScorePredictor(channels) for _ in self.prune_layers)
        self.keep_ratio = keep_ratio

    @classmethod
    def _zoo_entry(cls, arch: dict) -> Optional[str]:
        """The zoo name of an (embed_dims, depths, num_heads) triple (so it gets the zoo's prune_layers), or None."""
        for name, settings in cls.arch_zoo.items():
            if all(list(settings[k]) == list(arch[k]) if k != 'embed_dims' else settings[k] == arch[k]
                   for k in ('embed_dims', 'depths', 'num_heads')):
                return name
        return None

    # ------------------------------------------------------------------------------------------------ weights
    def convert_checkpoint(self, state_dict, checkpoint=None):
        return swin_to_backbone(state_dict, self.out_indices)

    def _freeze_stages(self):
        SwinTransformer._freeze_stages(self)

    # ------------------------------------------------------------------------------------------------ forward
    def forward_sparse(self, images: torch.Tensor) -> TokenSparsityResult:
        smallest = self.patch_size * self.window_size
        if min(images.shape[-2:]) < smallest:
            raise ValueError(f'input size {tuple(images.shape[-2:])} is smaller than one window: '
                             f'{self.window_size} x {self.patch_size}-pixel patches = {smallest} pixels per side')
        result = TokenSparsityResult(outs=())
        x, hw_shape = self.patch_embed(images)
        x = self.drop_after_pos(x)
        outs = []
        for i, stage in enumerate(self.stages):
            shift = self.pad_small_map or min(hw_shape) > self.window_size
            if i == self.sparse_stage and self.prunes:
                x = self._sparse_blocks(stage.blocks, x, hw_shape, shift, result)
            else:
                for block in stage.blocks:
                    x = block(x, hw_shape, shift=shift)
            out, out_hw_shape = x, hw_shape
            if stage.downsample is not None:
                x, hw_shape = stage.downsample(x, hw_shape)
            if i in self.out_indices:
                out = getattr(self, f'norm{i}')(out)
                if i == len(self.stages) - 1:
                    result.patch_tokens = out  # (B, N, C) normed final map, for feature distillation
                outs.append(out.view(-1, *out_hw_shape, self.num_features[i]).permute(0, 3, 1, 2).contiguous())
        result.outs = tuple(outs)
        return result

    def _sparse_blocks(self, blocks, x: torch.Tensor, hw_shape, shift: bool,
                       result: TokenSparsityResult) -> torch.Tensor:
        prune_at = {layer: s for s, layer in enumerate(self.prune_layers)}
        result.grid = tuple(hw_shape)
        routing = None
        for j, block in enumerate(blocks):
            if j in prune_at:
                routing = self.route(prune_at[j], x, result)
            x = block(x, hw_shape, routing, shift)
        return x


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoint layouts: mmdet / mmpretrain / mmseg / official Swin and official DynamicSwin -> ours
#
# mmdet's Swin names are ours, so its (and mmseg's / mmpretrain's) checkpoints load as they are. The official Swin
# ImageNet checkpoints and the official DynamicSwin ones are renamed here; for the Swin base keys we use mmdet's own
# ``swin_converter`` (it also reorders the patch-merging channels).
# ---------------------------------------------------------------------------------------------------------------------

def swin_to_backbone(state_dict: StateDict, out_indices: Sequence[int] = (3, )) -> StateDict:
    """mmdet / mmpretrain / official Swin or official DynamicSwin keys -> :class:`DynamicSwinTransformer` keys."""
    state_dict = strip_model_prefix(state_dict)
    if not any(k.startswith('layers.') for k in state_dict):
        return {k: v for k, v in state_dict.items() if not k.startswith(_HEAD_PREFIXES)}
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
            extra[f'score_predictors.{predictor.group(2)}.{official_predictor_key(predictor.group(3))}'] = value
        elif key.startswith('norm.'):
            extra[f'norm{last}.' + key[len('norm.'):]] = value
        else:
            base[key] = value
    converted = {k[len('backbone.'):]: v for k, v in swin_converter(base).items()}
    return {**converted, **extra}


def infer_swin_kwargs(state_dict: StateDict) -> dict:
    """:class:`DynamicSwinTransformer` arguments read off an official Swin / DynamicSwin checkpoint's shapes."""
    depths = [1 + max(int(k.split('.')[3]) for k in state_dict if re.match(rf'^layers\.{i}\.blocks\.\d+\.', k))
              for i in range(4)]
    num_heads = [state_dict[f'layers.{i}.blocks.0.attn.relative_position_bias_table'].shape[1] for i in range(4)]
    window = (int(round(state_dict['layers.0.blocks.0.attn.relative_position_bias_table'].shape[0] ** 0.5)) + 1) // 2
    arch = dict(embed_dims=state_dict['patch_embed.proj.weight'].shape[0], depths=depths, num_heads=num_heads)
    name = _zoo_name({k: {f: v[f] for f in arch} for k, v in DynamicSwinTransformer.arch_zoo.items()}, arch)
    fast = sorted(int(k.split('.')[3]) for k in state_dict if re.match(r'^layers\.2\.blocks\.\d+\.fastmlp\.', k))
    kwargs = dict(arch=name or arch, window_size=window, patch_size=state_dict['patch_embed.proj.weight'].shape[-1])
    if name is None:
        # the fast paths start at the first predictor and the official layouts space the three evenly; a dense
        # Swin gets what the model itself would choose (the one rule)
        kwargs['prune_layers'] = [fast[0] * (s + 1) for s in range(3)] if fast else default_prune_layers(depths[2])
    return kwargs
