"""DynamicViT: a plain ViT (DeiT or LV-ViT) that drops uninformative tokens as it goes deeper.

Rao et al., "DynamicViT: Efficient Vision Transformers with Dynamic Token Sparsification", NeurIPS 2021.

Score predictors run before the blocks in ``prune_layers``; stage ``s`` keeps ``keep_ratio ** (s + 1)`` of the
patch tokens (the cls token is always kept).

* Training: hard Gumbel-softmax decisions, nested with the previous ones; dropped tokens stay in the tensor but
  no token attends to them, so gradients still reach the predictors.
* Inference: the top-k tokens by score are gathered and the rest really leave the computation.

``keep_ratio`` is a plain attribute: changing it (config, ``--cfg-options``, or at run time) changes the budget
without retraining, and ``keep_ratio=1.0`` is exactly the dense DeiT / LV-ViT.

The checkpoint layouts it loads (official DynamicViT / LV-ViT / DeiT, timm, mmpretrain / mmseg ViTs) are converted
to its keys by the functions at the end of this file (:func:`to_backbone_state_dict`, :func:`infer_backbone_kwargs`).
"""
import re
from functools import partial
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.utils.checkpoint as cp
from timm.layers import Mlp, PatchEmbed, resample_abs_pos_embed
from timm.models.vision_transformer import Block

from ...layers import (KeepPolicyAttention, TokenPruning, TokenScorePredictor, check_prune_layers, init_vit_weights,
                       official_predictor_key)
from ...utils.checkpoint import OFFICIAL_HEAD_PREFIXES, CheckpointMismatchError, StateDict
from .base import SparseBackbone, TokenSparsityResult


def resample_pos_embed(pos_embed: torch.Tensor, new_grid, old_grid) -> torch.Tensor:
    """(1, 1 + h * w, C) position embedding with a cls token -> (1, 1 + H * W, C), bicubic.

    Without antialiasing, as DeiT's, mmpretrain's and mmseg's ViTs resize it (timm's default antialias=True gives
    other tables, so a checkpoint would not behave as it does there at other sizes).
    """
    return resample_abs_pos_embed(pos_embed, list(new_grid), list(old_grid), antialias=False)


class ConvStemPatchEmbed(nn.Module):
    """LV-ViT's patch embedding: three convs (stride 2) then a ``patch_size/2`` projection. (B,3,H,W)->(B,C,H/p,W/p)."""

    def __init__(self, patch_size: int = 16, in_channels: int = 3, embed_dims: int = 384, stem_channels: int = 64):
        super().__init__()

        def conv_bn_relu(cin, kernel, stride):
            conv = nn.Conv2d(cin, stem_channels, kernel, stride, kernel // 2, bias=False)
            return conv, nn.BatchNorm2d(stem_channels)

        self.conv1, self.bn1 = conv_bn_relu(in_channels, 7, 2)
        self.conv2, self.bn2 = conv_bn_relu(stem_channels, 3, 1)
        self.conv3, self.bn3 = conv_bn_relu(stem_channels, 3, 1)
        self.proj = nn.Conv2d(stem_channels, embed_dims, patch_size // 2, patch_size // 2)

    def forward(self, x):
        for conv, bn in ((self.conv1, self.bn1), (self.conv2, self.bn2), (self.conv3, self.bn3)):
            x = torch.relu(bn(conv(x)))
        return self.proj(x)


class DynamicViTBlock(Block):
    """timm's pre-norm ViT block whose attention accepts a keep policy. (B, N, C) -> (B, N, C).

    ``residual_scale`` divides both residual branches (LV-ViT uses 2; DeiT 1).
    """

    def __init__(self, embed_dims: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 drop_rate: float = 0.0, attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0,
                 residual_scale: float = 1.0):
        super().__init__(embed_dims, num_heads, mlp_ratio, qkv_bias, proj_drop=drop_rate, attn_drop=attn_drop_rate,
                         drop_path=drop_path_rate, norm_layer=partial(nn.LayerNorm, eps=1e-6), mlp_layer=Mlp,
                         attn_layer=KeepPolicyAttention)
        self.residual_scale = residual_scale

    def forward(self, x: torch.Tensor, policy: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: (B, N, C); policy: (B, N) 1 kept / 0 dropped (training-time pruning), or None."""
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), policy))) / self.residual_scale
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x)))) / self.residual_scale


class DynamicViT(SparseBackbone):
    """DynamicViT backbone (DeiT / LV-ViT with learned token pruning).

    Args:
        arch: a name in :attr:`arch_zoo` or a dict with ``embed_dims``, ``num_layers``, ``num_heads`` and
            optionally ``mlp_ratio``, ``qkv_bias``, ``stem`` ('patch' | 'conv'), ``residual_scale``,
            ``prune_layers``.
        img_size: training resolution; the position embedding is resized for other input sizes.
        patch_size: patch size (input sides must be multiples of it).
        keep_ratio: base keep ratio r (stage s keeps r**(s+1) of the patch tokens), or one ratio per stage.
            1.0 disables pruning.
        prune_layers: blocks that get a score predictor in front; default from the arch (3, 6, 9 for 12 blocks).
        out_type: ``'cls_token'`` (B, C), ``'raw'`` (B, 1+K, C) remaining tokens, ``'featmap'`` (B, C, H, W) with
            pruned tokens put back at their positions (their features from when they were dropped), or
            ``'avg_featmap'`` (B, C) mean of the remaining patch tokens.
        out_indices: blocks whose outputs are returned (-1 = last).
        final_norm: apply the final LayerNorm to the last output.
        drop_rate / attn_drop_rate / drop_path_rate: regularisation (drop path grows linearly with depth).
        frozen_stages: freeze the patch embedding and this many first blocks (0 = nothing frozen).
        norm_eval: keep BatchNorm layers (LV-ViT's stem) in eval mode during training.
        with_cp: gradient checkpointing of the blocks.
        init_cfg: ``dict(type='Pretrained', checkpoint=..., prefix=...)`` loads our, the official DynamicViT,
            DeiT (timm / official), LV-ViT or mmpretrain-ViT checkpoints (converted on the fly).
    """
    arch_zoo: Dict[str, dict] = {
        'deit-tiny': dict(embed_dims=192, num_layers=12, num_heads=3, mlp_ratio=4.0),
        'deit-256': dict(embed_dims=256, num_layers=12, num_heads=4, mlp_ratio=4.0),
        'deit-small': dict(embed_dims=384, num_layers=12, num_heads=6, mlp_ratio=4.0),
        'deit-base': dict(embed_dims=768, num_layers=12, num_heads=12, mlp_ratio=4.0),
        'lvvit-s': dict(embed_dims=384, num_layers=16, num_heads=6, mlp_ratio=3.0, qkv_bias=False, stem='conv',
                        residual_scale=2.0),
        'lvvit-m': dict(embed_dims=512, num_layers=20, num_heads=8, mlp_ratio=3.0, qkv_bias=False, stem='conv',
                        residual_scale=2.0),
    }
    arch_defaults = dict(mlp_ratio=4.0, qkv_bias=True, stem='patch', residual_scale=1.0)
    arch_options = (*arch_defaults, 'prune_layers')
    OUT_TYPES = ('cls_token', 'raw', 'featmap', 'avg_featmap')
    num_extra_tokens = 1

    def __init__(self,
                 arch: Union[str, dict] = 'deit-small',
                 img_size: int = 224,
                 patch_size: int = 16,
                 in_channels: int = 3,
                 keep_ratio: Union[float, Sequence[float]] = 0.7,
                 prune_layers: Optional[Sequence[int]] = None,
                 out_type: str = 'cls_token',
                 out_indices: Union[int, Sequence[int]] = -1,
                 final_norm: bool = True,
                 drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0,
                 frozen_stages: int = 0,
                 norm_eval: bool = False,
                 with_cp: bool = False,
                 init_cfg: Optional[dict] = None):
        super().__init__(init_cfg=init_cfg)
        self.arch_settings = self.resolve_arch(arch, required=('embed_dims', 'num_layers', 'num_heads'))
        settings = {**self.arch_defaults, **self.arch_settings}
        self.embed_dims = embed_dims = settings['embed_dims']
        self.num_layers = depth = settings['num_layers']
        if out_type not in self.OUT_TYPES:
            raise ValueError(f'out_type must be one of {self.OUT_TYPES}, got {out_type!r}')
        self.out_type = out_type
        self.out_indices = self.resolve_out_indices(out_indices, depth)
        self.patch_size = patch_size
        self.grid_size = self._check_grid(img_size, img_size)

        if settings['stem'] == 'conv':
            self.patch_embed = ConvStemPatchEmbed(patch_size, in_channels, embed_dims)
        elif settings['stem'] == 'patch':
            self.patch_embed = PatchEmbed(img_size, patch_size, in_channels, embed_dims, flatten=False,
                                          strict_img_size=False)
        else:
            raise ValueError(f"arch stem must be 'patch' or 'conv', got {settings['stem']!r}")
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dims))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid_size[0] * self.grid_size[1] + 1, embed_dims))
        self.pos_drop = nn.Dropout(drop_rate)
        self._resized_pos_embeds = {}  # grid -> (weights version, resampled embedding), see resized_pos_embed

        drop_paths = torch.linspace(0, drop_path_rate, depth).tolist()
        self.blocks = nn.ModuleList(
            DynamicViTBlock(embed_dims, settings['num_heads'], settings['mlp_ratio'], settings['qkv_bias'],
                            drop_rate, attn_drop_rate, drop_paths[i], settings['residual_scale'])
            for i in range(depth))
        self.final_norm = final_norm
        self.norm = nn.LayerNorm(embed_dims, eps=1e-6) if final_norm else nn.Identity()

        default_prune = settings.get('prune_layers', [depth // 4 * (s + 1) for s in range(3)])
        self.prune_layers = check_prune_layers(prune_layers if prune_layers is not None else default_prune, depth)
        self.score_predictors = nn.ModuleList(TokenScorePredictor(embed_dims) for _ in self.prune_layers)
        self.keep_ratio = keep_ratio  # validated by the property below
        self.frozen_stages = frozen_stages
        self.norm_eval = norm_eval
        self.with_cp = with_cp
        self._freeze_stages()

    # ----------------------------------------------------------------------------------------------- weights
    def default_init(self):
        init_vit_weights(self, self.pos_embed, self.cls_token)

    def convert_checkpoint(self, state_dict: Dict[str, torch.Tensor], checkpoint=None) -> Dict[str, torch.Tensor]:
        """Any supported ViT layout -> our keys; the position embedding is resampled to ``img_size``.

        Two exact adaptations: a patch embedding without bias (mmseg's ViT configs, ``patch_bias=False``) gets a zero
        bias, and without a final norm (``final_norm=False``, as mmseg's UperNet ViTs) a classifier checkpoint's
        final ``norm`` is left out, since nothing here would use it.
        """
        state_dict = to_backbone_state_dict(state_dict)
        if 'pos_embed' in state_dict and state_dict['pos_embed'].shape != self.pos_embed.shape:
            old = state_dict['pos_embed']
            old_side = int(round((old.shape[1] - 1) ** 0.5))
            state_dict['pos_embed'] = resample_pos_embed(old, self.grid_size, (old_side, old_side))
        weight, bias = 'patch_embed.proj.weight', 'patch_embed.proj.bias'
        if weight in state_dict and bias not in state_dict and self.patch_embed.proj.bias is not None:
            state_dict[bias] = state_dict[weight].new_zeros(state_dict[weight].shape[0])
        if not self.final_norm:
            state_dict = {k: v for k, v in state_dict.items() if not k.startswith('norm.')}
        return state_dict

    # A dense DeiT / LV-ViT checkpoint has no predictors; they keep their fresh init.
    optional_checkpoint_groups = (r'^score_predictors\.', )

    def _freeze_stages(self):
        if self.frozen_stages <= 0:
            return
        frozen = [self.patch_embed, *self.blocks[:self.frozen_stages]]
        self.pos_embed.requires_grad = False
        self.cls_token.requires_grad = False
        for module in frozen:
            module.eval()
            for param in module.parameters():
                param.requires_grad = False

    def get_layer_depth(self, param_name: str, prefix: str = ''):
        """Layer id for layer-wise lr decay (mmpretrain's contract): embeddings 0, block i -> i + 1.

        A score predictor belongs to the block it sits in front of.
        """
        num_layers = self.num_layers + 2
        if not param_name.startswith(prefix):
            return num_layers - 1, num_layers
        name = param_name[len(prefix):]
        if name.startswith(('cls_token', 'pos_embed', 'patch_embed')):
            return 0, num_layers
        if name.startswith('blocks.'):
            return int(name.split('.')[1]) + 1, num_layers
        if name.startswith('score_predictors.'):
            return self.prune_layers[int(name.split('.')[1])] + 1, num_layers
        return num_layers - 1, num_layers

    # ----------------------------------------------------------------------------------------------- forward
    def _check_grid(self, height: int, width: int) -> Tuple[int, int]:
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(f'input size {height}x{width} is not a multiple of the patch size {self.patch_size}; '
                             f'resize or pad the image to a multiple of {self.patch_size}')
        return height // self.patch_size, width // self.patch_size

    def embed(self, images: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int]]:
        """(B, 3, H, W) -> tokens (B, 1 + N, C) with cls token and position embedding, and the patch grid."""
        grid = self._check_grid(*images.shape[-2:])
        x = self.patch_embed(images).flatten(2).transpose(1, 2)
        pos_embed = self.pos_embed if grid == self.grid_size else self.resized_pos_embed(grid)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + pos_embed
        return self.pos_drop(x), grid

    def resized_pos_embed(self, grid: Tuple[int, int]) -> torch.Tensor:
        """The position embedding resampled to a ``grid`` of patches: (1, 1 + H * W, C).

        At inference it is computed once per grid and reused while the weights stay the same (a detector's or
        segmentor's test images share a few sizes; at 800 x 1333 resampling is a bicubic pass over 4,200 tokens);
        in training it is recomputed, so that its gradient reaches the embedding. Inside ``torch.compile`` /
        ``torch.export`` it is part of the graph (the cache lives outside any graph).
        """
        if (self.training and torch.is_grad_enabled()) or torch.compiler.is_compiling():
            return resample_pos_embed(self.pos_embed, grid, self.grid_size)
        weights = self.pos_embed
        version = (weights._version, weights.data_ptr(), weights.dtype)  # in-place updates and moves change it
        cached = self._resized_pos_embeds.get(grid)
        if cached is None or cached[0] != version:
            with torch.no_grad():
                cached = (version, resample_pos_embed(weights, grid, self.grid_size))
            self._resized_pos_embeds[grid] = cached
        return cached[1]

    def _run_block(self, index: int, x: torch.Tensor, policy: Optional[torch.Tensor]) -> torch.Tensor:
        block = self.blocks[index]
        if self.with_cp and x.requires_grad:
            return cp.checkpoint(block, x, policy, use_reentrant=False)
        return block(x, policy)

    def forward_sparse(self, images: torch.Tensor) -> TokenSparsityResult:
        """Run the backbone and return outputs together with what was kept. See :class:`TokenSparsityResult`."""
        x, grid = self.embed(images)
        result = TokenSparsityResult(outs=(), grid=grid)
        pruning = TokenPruning(num_patches=x.shape[1] - 1, keep_dropped=self.out_type == 'featmap')
        prune_at = {layer: stage for stage, layer in enumerate(self.prune_layers)} if self.prunes else {}
        outs = []
        for i in range(self.num_layers):
            if i in prune_at:
                stage = prune_at[i]
                if self.training:
                    result.keep_decisions.append(pruning.sample(self.score_predictors[stage], x))
                    result.token_mask = result.keep_decisions[-1]
                else:
                    x = pruning.select(self.score_predictors[stage], x, self.stage_ratios[stage])
                    result.kept_indices.append(pruning.kept)
            x = self._run_block(i, x, pruning.policy)
            last = i == self.num_layers - 1
            if last:
                x = self.norm(x)
                result.patch_tokens = x[:, 1:]
            if i in self.out_indices:
                if last and pruning.dropped is not None:
                    # LayerNorm is per token: norm(fill(d, x)) == fill(norm(d), norm(x))
                    pruning.dropped = self.norm(pruning.dropped)
                outs.append(self.format_output(x, pruning, grid))
        result.outs = tuple(outs)
        return result

    def format_output(self, x: torch.Tensor, pruning: TokenPruning, grid: Tuple[int, int]) -> torch.Tensor:
        """(B, 1 + K, C) tokens -> the ``out_type`` output; ``'featmap'`` puts the pruned tokens back."""
        if self.out_type == 'raw':
            return x
        if self.out_type == 'cls_token':
            return x[:, 0]
        if self.out_type == 'avg_featmap':
            return x[:, 1:].mean(dim=1)
        patches = x[:, 1:] if pruning.kept is None else pruning.fill_back(x[:, 1:])
        # C spelled out, not -1: an empty batch (B = 0) leaves -1 undetermined
        return patches.transpose(1, 2).reshape(x.shape[0], x.shape[-1], *grid)


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoint layouts: official DynamicViT / LV-ViT / DeiT / timm / mmpretrain / mmseg -> ours
#
# Our backbone keeps the official module names (``patch_embed.proj``, ``blocks.N.attn.qkv``, ``blocks.N.mlp.fc1``,
# ``norm``, ...), which the official DynamicViT, official DeiT, timm and LV-ViT checkpoints share, and names the
# score predictors plainly. Supported inputs:
#
# * official DynamicViT / LV-ViT (``score_predictor.K.in_conv.0`` ...), official DeiT / timm DeiT, LV-ViT;
# * mmpretrain's and mmseg's ``VisionTransformer`` (``layers.N.ln1``, ``ffn.layers.0.0``, mmseg's
#   ``attn.attn.in_proj_weight``, ...), e.g. mmpretrain DeiT or an mmseg ViT UperNet's backbone;
# * our own backbone keys, or our classifier keys (``backbone.*``, ``head.*``).
# ---------------------------------------------------------------------------------------------------------------------

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
    if any(k.startswith('score_predictor.') for k in keys) or any(k.startswith(OFFICIAL_HEAD_PREFIXES) for k in keys):
        return 'official'
    # ours, or a headless official / timm checkpoint (exactly our backbone names); anything else is refused by the
    # fit check, which names the keys
    return 'backbone'


def _rename_predictor(key: str) -> str:
    match = re.match(r'^score_predictor\.(\d+)\.(.*)$', key)
    if not match:
        return key
    rest = match.group(2)
    return f'score_predictors.{match.group(1)}.{official_predictor_key(rest)}'


def split_official(state_dict: StateDict) -> Tuple[StateDict, StateDict]:
    """Official / timm layout -> (backbone keys in our names, head keys in the official names)."""
    backbone, head = {}, {}
    for key, value in state_dict.items():
        if key.startswith(OFFICIAL_HEAD_PREFIXES):
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
