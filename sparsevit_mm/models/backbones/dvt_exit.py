"""The exits of DVT: ViTs on 7x7, 10x10 and 14x14 tokens that reuse what earlier exits computed.

Wang et al., "Not All Images are Worth 16x16 Words: Dynamic Transformers for Efficient Image Recognition",
NeurIPS 2021.

An exit is a complete ViT (tokenizer, cls token, position embedding, blocks, final norm). A downstream exit can
reuse the previous exit's work in two ways:

* feature reuse: the previous exit's final tokens (before its norm) pass, in every block, through a small
  ``LayerNorm -> MLP (D -> 128 -> 48)``, are resampled to the new token grid, and join the block's MLP input;
* relation reuse: all of the previous exit's pre-softmax attention logits (L x H maps) are mixed by a 1x1-conv MLP,
  resampled along keys and then queries, and added to the logits of the corresponding block.

Tokenizers: T2T (two soft splits with Performer token mixers, then a projection; T2T-ViT) or a convolutional patch
embedding (DeiT). Sizes are set so that a 224 px image gives 7x7, 10x10 or 14x14 tokens.
"""
import math
from typing import List, NamedTuple, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmengine.model import BaseModule
from mmpretrain.models.backbones.t2t_vit import get_sinusoid_encoding
from timm.layers import Attention, DropPath, Mlp

from ...layers import init_vit_weights
from ...utils.caching import eager_cache
from ...utils.checkpoint import CheckpointLayoutMixin

# first soft split (kernel, stride, padding) of the T2T tokenizer, and the patch embedding (kernel = stride,
# padding) of the DeiT tokenizer, per token grid at 224 px
T2T_FIRST_SPLIT = {7: (14, 8, 3), 10: (11, 6, 5), 14: (7, 4, 2)}
PATCH_EMBED = {7: (32, 0), 10: (23, 3), 14: (16, 0)}
REUSED_FEATURE_DIMS = 48


@eager_cache(maxsize=None)
def _resampling_matrix(side_in: int, side_out: int) -> torch.Tensor:
    """(side_in, side_out) matrix of DVT's 1-d resampler: nearest 2x upsampling, then adaptive average pooling."""
    eye = torch.eye(side_in, dtype=torch.float64)[None]
    return F.adaptive_avg_pool1d(F.interpolate(eye, scale_factor=2, mode='nearest'), side_out)[0].float()


def resample_tokens(x: torch.Tensor, side_out: int) -> torch.Tensor:
    """(..., h * h) values on a flattened h x h grid -> (..., side_out^2): DVT's nearest-up + adaptive-avg-pool.

    Both steps are linear and separable, so this is ``A^T X A`` per grid with a small fixed matrix A: the same
    numbers as ``adaptive_avg_pool2d(interpolate(x, scale_factor=2), side_out)`` without the 4x larger
    intermediate map.
    """
    side_in = int(math.isqrt(x.shape[-1]))
    matrix = _resampling_matrix(side_in, side_out).to(device=x.device, dtype=x.dtype)
    grids = x.reshape(*x.shape[:-1], side_in, side_in)
    return (matrix.t() @ grids @ matrix).flatten(-2)


class PerformerTokenMixer(nn.Module):
    """T2T's Performer token mixer: linear attention with positive random features. (B, N, C) -> (B, N, dims).

    ``random_features`` (m x dims, orthogonal, scaled by sqrt(m)) is fixed, but stored in checkpoints.
    """

    def __init__(self, in_channels: int, dims: int = 64, kernel_ratio: float = 0.5):
        super().__init__()
        self.dims = dims
        self.norm1 = nn.LayerNorm(in_channels)
        self.kqv = nn.Linear(in_channels, 3 * dims)
        self.proj = nn.Linear(dims, dims)
        self.norm2 = nn.LayerNorm(dims)
        self.mlp = nn.Sequential(nn.Linear(dims, dims), nn.GELU(), nn.Linear(dims, dims), nn.Identity())
        num_features = int(dims * kernel_ratio)
        features = nn.init.orthogonal_(torch.empty(num_features, dims)) * math.sqrt(num_features)
        self.random_features = nn.Parameter(features, requires_grad=False)

    def _feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """Positive random features exp(w.x - |x|^2 / 2) / sqrt(m): (B, N, dims) -> (B, N, m)."""
        m = self.random_features.shape[0]
        projection = x.float() @ self.random_features.t()
        return torch.exp(projection - x.float().pow(2).sum(-1, keepdim=True) / 2) / math.sqrt(m)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k, q, v = self.kqv(self.norm1(x)).split(self.dims, dim=-1)
        k_features, q_features = self._feature_map(k), self._feature_map(q)
        normaliser = q_features @ k_features.sum(dim=1).unsqueeze(-1)  # (B, N, 1)
        context = k_features.transpose(1, 2) @ v.float()  # (B, m, dims)
        y = (q_features @ context) / (normaliser + 1e-8)
        x = v + self.proj(y.to(v.dtype))  # the residual is on v: the input has another width
        return x + self.mlp(self.norm2(x))


class T2TTokenizer(nn.Module):
    """Tokens-to-token: unfold, Performer mixer, unfold 3x3/2, Performer mixer, unfold 3x3/2, project.

    (B, 3, 224, 224) -> (B, grid * grid, embed_dims).
    """

    def __init__(self, grid: int, embed_dims: int, in_channels: int = 3, token_dims: int = 64):
        super().__init__()
        kernel, stride, padding = T2T_FIRST_SPLIT[grid]
        self.first_split = nn.Unfold(kernel, stride=stride, padding=padding)
        self.split = nn.Unfold(3, stride=2, padding=1)
        self.mixer1 = PerformerTokenMixer(in_channels * kernel * kernel, token_dims)
        self.mixer2 = PerformerTokenMixer(token_dims * 9, token_dims)
        self.project = nn.Linear(token_dims * 9, embed_dims)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.mixer1(self.first_split(images).transpose(1, 2))
        for mixer in (self.mixer2, None):
            batch, num, channels = x.shape
            side = int(math.isqrt(num))
            x = self.split(x.transpose(1, 2).reshape(batch, channels, side, side)).transpose(1, 2)
            x = mixer(x) if mixer is not None else x
        return self.project(x)


class ConvPatchTokenizer(nn.Module):
    """DeiT's patch embedding, sized for the exit's grid: (B, 3, 224, 224) -> (B, grid * grid, embed_dims)."""

    def __init__(self, grid: int, embed_dims: int, in_channels: int = 3):
        super().__init__()
        kernel, padding = PATCH_EMBED[grid]
        self.proj = nn.Conv2d(in_channels, embed_dims, kernel, kernel, padding)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.proj(images).flatten(2).transpose(1, 2)


class RelationAttention(Attention):
    """timm's self-attention that can add reused relations to its logits and returns its own pre-softmax logits."""

    def forward(self, x: torch.Tensor, relation: Optional[torch.Tensor] = None,
                need_logits: bool = True) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """x: (B, N, C); relation: (B, H, N, N) added to the logits. Returns the output and (B, H, N, N) logits."""
        if not need_logits:  # nobody downstream needs the logits: timm's forward (SDPA) with the relations as a bias
            return super().forward(x, attn_mask=relation), None
        batch, num, _ = x.shape
        qkv = self.qkv(x).reshape(batch, num, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, H, N, d)
        logits = (q @ k.transpose(-2, -1)) * self.scale
        if relation is not None:
            logits = logits + relation
        out = (self.attn_drop(logits.softmax(dim=-1)) @ v).transpose(1, 2).reshape(batch, num, self.attn_dim)
        return self.proj_drop(self.proj(out)), logits


class DVTBlock(nn.Module):
    """Pre-norm block; with feature reuse, the MLP also sees 48 channels made from the previous exit's tokens.

    Built from timm's parts, not a timm ``Block``: with feature reuse its ``norm2`` / ``mlp`` are D + 48 wide.
    """

    def __init__(self, embed_dims: int, num_heads: int, mlp_ratio: float, qkv_bias: bool, drop_path: float,
                 feature_reuse: bool, norm_eps: float):
        super().__init__()
        extra = REUSED_FEATURE_DIMS if feature_reuse else 0
        self.norm1 = nn.LayerNorm(embed_dims, eps=norm_eps)
        self.attn = RelationAttention(embed_dims, num_heads, qkv_bias=qkv_bias)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(embed_dims + extra, eps=norm_eps)
        self.mlp = Mlp(embed_dims + extra, int(embed_dims * mlp_ratio), embed_dims)
        if feature_reuse:
            self.feature_reuse = nn.Sequential(nn.LayerNorm(embed_dims, eps=norm_eps),
                                               Mlp(embed_dims, 128, REUSED_FEATURE_DIMS))

    def reused_features(self, previous: torch.Tensor, grid: int) -> torch.Tensor:
        """Previous exit's tokens (B, 1 + n, D) -> (B, 1 + grid^2, 48), with a zero vector in the cls slot."""
        features = resample_tokens(self.feature_reuse(previous[:, 1:]).transpose(1, 2), grid).transpose(1, 2)
        return torch.cat([features.new_zeros(features.shape[0], 1, features.shape[2]), features], dim=1)

    def forward(self, x: torch.Tensor, reused: Optional[torch.Tensor] = None, relation: Optional[torch.Tensor] = None,
                need_logits: bool = True):
        attended, logits = self.attn(self.norm1(x), relation, need_logits)
        x = x + self.drop_path(attended)
        mlp_in = x if reused is None else torch.cat([x, reused], dim=-1)
        return x + self.drop_path(self.mlp(self.norm2(mlp_in))), logits


class ExitState(NamedTuple):
    """What an exit hands to the next one (and to its classifier head)."""
    tokens: torch.Tensor  # (B, 1 + N, D) final tokens before the norm (feature reuse source)
    relations: Optional[List[torch.Tensor]]  # per block (B, H, 1 + N, 1 + N) pre-softmax logits
    features: torch.Tensor  # (B, D) normed cls token (the head's input)
    grid: int


class DVTExit(CheckpointLayoutMixin, BaseModule):
    """One exit of DVT: a ViT on ``grid x grid`` tokens, optionally reusing the previous exit's features / relations.

    Args:
        grid: 7, 10 or 14 (token grid at 224 px).
        embed_dims / depth / num_heads / mlp_ratio / qkv_bias: the transformer.
        tokenizer: ``'t2t'`` (T2T-ViT; fixed sinusoidal position table) or ``'patch'`` (DeiT; learned).
        feature_reuse / relation_reuse: reuse the previous exit's final tokens / attention logits (the previous
            exit must have the same depth and heads).
        drop_path_rate: stochastic depth, growing linearly over the blocks.
    """

    def __init__(self, grid: int, embed_dims: int, depth: int, num_heads: int, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, tokenizer: str = 'patch', feature_reuse: bool = False,
                 relation_reuse: bool = False, drop_path_rate: float = 0.0, init_cfg=None):
        super().__init__(init_cfg=init_cfg)
        if grid not in T2T_FIRST_SPLIT:
            raise ValueError(f'DVT exits use 7x7, 10x10 or 14x14 tokens at 224 px; got grid {grid}')
        self.grid, self.embed_dims, self.depth, self.num_heads = grid, embed_dims, depth, num_heads
        self.feature_reuse, self.relation_reuse = feature_reuse, relation_reuse
        if tokenizer == 't2t':
            self.tokenizer = T2TTokenizer(grid, embed_dims)
            # T2T-ViT's fixed sine / cosine table (mmpretrain's copy of the official one): (1, 1 + grid^2, D)
            self.pos_embed = nn.Parameter(get_sinusoid_encoding(grid * grid + 1, embed_dims), requires_grad=False)
            norm_eps = 1e-5
        elif tokenizer == 'patch':
            self.tokenizer = ConvPatchTokenizer(grid, embed_dims)
            self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid + 1, embed_dims))
            norm_eps = 1e-6
        else:
            raise ValueError(f"tokenizer must be 't2t' or 'patch', got {tokenizer!r}")
        self.tokenizer_type = tokenizer
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dims))
        rates = torch.linspace(0, drop_path_rate, depth).tolist()
        self.blocks = nn.ModuleList(
            DVTBlock(embed_dims, num_heads, mlp_ratio, qkv_bias, rates[i], feature_reuse, norm_eps)
            for i in range(depth))
        if relation_reuse:
            channels = depth * num_heads
            self.relation_reuse = nn.Sequential(nn.Conv2d(channels, 3 * channels, 1), nn.GELU(),
                                                nn.Conv2d(3 * channels, channels, 1))
        self.norm = nn.LayerNorm(embed_dims, eps=norm_eps)

    def default_init(self):
        # T2T's sinusoidal position table stays as it is
        embeddings = (self.pos_embed, self.cls_token) if self.tokenizer_type == 'patch' else (self.cls_token, )
        init_vit_weights(self, *embeddings)

    def reused_relations(self, previous: List[torch.Tensor]) -> List[torch.Tensor]:
        """Previous exit's L logit maps (B, H, 1 + n, 1 + n) -> L bias maps (B, H, 1 + N, 1 + N) for this exit."""
        relations = self.relation_reuse(torch.cat(previous, dim=1))  # (B, L*H, 1 + n, 1 + n)
        batch, channels, rows, _ = relations.shape
        flat = relations.reshape(batch * channels, rows, rows)
        # keys first (the patch-key columns of every query row), then queries; the cls row / column stay as they are
        flat = torch.cat([flat[:, :, :1], resample_tokens(flat[:, :, 1:], self.grid)], dim=2).transpose(1, 2)
        flat = torch.cat([flat[:, :, :1], resample_tokens(flat[:, :, 1:], self.grid)], dim=2).transpose(1, 2)
        relations = flat.reshape(batch, channels, flat.shape[1], flat.shape[2])
        return list(relations.split(self.num_heads, dim=1))

    def forward_exit(self, images: torch.Tensor, previous: Optional[ExitState] = None,
                     need_relations: bool = False) -> ExitState:
        """Run this exit on (B, 3, 224, 224) images, reusing ``previous`` (the preceding exit's state)."""
        if (self.feature_reuse or self.relation_reuse) and previous is None:
            raise ValueError('this exit reuses the previous exit; pass its ExitState (or run the whole DVT)')
        x = self.tokenizer(images)
        if x.shape[1] != self.grid * self.grid:
            raise ValueError(f'DVT exits are built for 224x224 inputs ({self.grid}x{self.grid} tokens); got an input '
                             f'of {tuple(images.shape[-2:])} giving {x.shape[1]} tokens')
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        relations = self.reused_relations(previous.relations) if self.relation_reuse else [None] * self.depth
        logits = []
        for block, relation in zip(self.blocks, relations):
            reused = block.reused_features(previous.tokens, self.grid) if self.feature_reuse else None
            x, block_logits = block(x, reused, relation, need_relations)
            logits.append(block_logits)
        return ExitState(x, logits if need_relations else None, self.norm(x)[:, 0], self.grid)

    def forward(self, images: torch.Tensor) -> Tuple[torch.Tensor]:
        """As a standalone backbone (an exit without reuse): (B, 3, 224, 224) -> ((B, D) cls feature, )."""
        return (self.forward_exit(images).features, )
