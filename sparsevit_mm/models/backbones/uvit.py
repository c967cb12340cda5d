"""U-ViT: a plain ViT with long skip connections as a diffusion backbone (Bao et al., CVPR 2023).

Every input is a token: [label], time, patches (+ a learned position embedding). ``depth // 2`` in-blocks, a mid
block and ``depth // 2`` out-blocks; each out-block first joins the output of its mirror in-block (last in, first
out) by concatenation and a Linear(2D -> D). Head: LayerNorm -> Linear(p * p * C) -> unpatchify -> optional 3x3
conv. Module names follow the official code, so official checkpoints load as they are; the functions at the end of
this file read a ``UViT`` config off an official checkpoint and move its keys to the :class:`UViTDiffusion` layout.
"""
import math
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint as cp
from diffusers.models.embeddings import get_timestep_embedding
from mmengine.model import BaseModule
from timm.layers import Attention, Mlp, PatchEmbed
from timm.models.vision_transformer import Block

from ...layers import init_vit_weights
from ...utils.arch import resolve_arch
from ...utils.checkpoint import CheckpointLayoutMixin, CheckpointMismatchError, StateDict

ATTENTION_BACKENDS = ('sdpa', 'xformers', 'math')


def timestep_embedding(timesteps: torch.Tensor, dims: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (B,) timesteps -> (B, dims), cosines first (as U-ViT / ADM): diffusers' table with
    frequencies ``exp(-log(max_period) * i / (dims // 2))``."""
    return get_timestep_embedding(timesteps, dims, flip_sin_to_cos=True, downscale_freq_shift=0,
                                  max_period=max_period)


class UViTAttention(Attention):
    """timm's multi-head self-attention over (B, N, C) tokens with a switchable ``backend``: 'sdpa' (timm's fused
    path: flash / memory-efficient kernels), 'math' (timm's explicit softmax path) or 'xformers' (optional, CUDA).
    """

    def __init__(self, embed_dims: int, num_heads: int, qkv_bias: bool = False, backend: str = 'sdpa',
                 **attention_options):
        super().__init__(embed_dims, num_heads, qkv_bias=qkv_bias, **attention_options)
        self.backend = backend

    @property
    def backend(self) -> str:
        return self._backend

    @backend.setter
    def backend(self, backend: str):
        if backend not in ATTENTION_BACKENDS:
            raise ValueError(f'attention backend must be one of {ATTENTION_BACKENDS}, got {backend!r}')
        self._backend = backend
        self.fused_attn = backend == 'sdpa'  # timm's switch between SDPA and the explicit softmax

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False) -> torch.Tensor:
        """(B, N, C) -> (B, N, C); ``attn_mask`` / ``is_causal`` as timm's (not with 'xformers')."""
        if self.backend != 'xformers':
            return super().forward(x, attn_mask, is_causal)
        if attn_mask is not None or is_causal:
            raise ValueError("the 'xformers' attention backend takes no attention mask")
        import xformers.ops as xops  # optional; CUDA only
        batch, num, _ = x.shape
        q, k, v = self.qkv(x).reshape(batch, num, 3, self.num_heads, self.head_dim).unbind(2)  # (B, N, H, d)
        out = xops.memory_efficient_attention(q, k, v).reshape(batch, num, self.attn_dim)
        return self.proj_drop(self.proj(out))


class UViTBlock(Block):
    """timm's pre-norm ViT block (LayerNorm eps 1e-5, no bias in qkv by default); an out-block first merges the long
    skip: Linear(concat[x, skip]) (current stream first). (B, N, D) [, (B, N, D)] -> (B, N, D)."""

    def __init__(self, embed_dims: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = False,
                 skip: bool = False, backend: str = 'sdpa'):
        super().__init__(embed_dims, num_heads, mlp_ratio, qkv_bias, norm_layer=nn.LayerNorm, mlp_layer=Mlp,
                         attn_layer=UViTAttention)
        self.attn.backend = backend
        self.skip_linear = nn.Linear(2 * embed_dims, embed_dims) if skip else None

    def forward(self, x: torch.Tensor, skip: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.skip_linear is not None:
            x = self.skip_linear(torch.cat([x, skip], dim=-1))
        return super().forward(x)


class UViT(CheckpointLayoutMixin, BaseModule):
    """The U-ViT noise-prediction network: (x_t, timesteps[, labels]) -> predicted noise, same shape as x_t.

    Args:
        arch: ``'small'`` (512 wide, 13 blocks, 8 heads), ``'mid'`` (768/17/12), ``'large'`` (1024/21/16),
            ``'huge'`` (1152/29/16, no final conv), or a dict with ``embed_dims``, ``depth`` (in + out blocks, the
            mid block comes on top), ``num_heads``.
        img_size / patch_size / in_channels: the (latent) image the network sees; patch 2 on 32x32 latents, 4 on
            64x64 inputs. Sides must be multiples of the patch size.
        num_classes: class-conditional with this many labels, one of which may be the null label of classifier-free
            guidance (ImageNet: 1001, label 1000 is null); 0 for an unconditional model.
        conv: the final 3x3 convolution (the official Huge models have none; default: per arch).
        mlp_time_embed: an MLP on the time embedding (off in every official config).
        with_cp: gradient checkpointing of every block.
        attention: 'sdpa' (default; flash / memory-efficient on GPU), 'xformers' (optional, CUDA) or 'math'.
    """
    arch_zoo = {
        'small': dict(embed_dims=512, depth=12, num_heads=8, conv=True),
        'mid': dict(embed_dims=768, depth=16, num_heads=12, conv=True),
        'large': dict(embed_dims=1024, depth=20, num_heads=16, conv=True),
        'huge': dict(embed_dims=1152, depth=28, num_heads=16, conv=False),
    }

    def __init__(self, arch='small', img_size: int = 32, patch_size: int = 2, in_channels: int = 3,
                 num_classes: int = 0, mlp_ratio: float = 4.0, qkv_bias: bool = False, conv: Optional[bool] = None,
                 mlp_time_embed: bool = False, with_cp: bool = False, attention: str = 'sdpa',
                 init_cfg=None):
        super().__init__(init_cfg=init_cfg)
        arch = resolve_arch('UViT', arch, self.arch_zoo, required=('embed_dims', 'depth', 'num_heads'),
                            optional=('conv', ))
        if img_size % patch_size:
            raise ValueError(f'image size {img_size} is not a multiple of the patch size {patch_size}')
        dims = self.embed_dims = arch['embed_dims']
        self.img_size, self.patch_size, self.in_channels = img_size, patch_size, in_channels
        self.num_classes = num_classes
        self.with_cp = with_cp
        # (B, C, H, W) -> (B, H * W / p^2, D); sizes are checked by check_inputs / UViTBackbone
        self.patch_embed = PatchEmbed(img_size, patch_size, in_channels, dims, strict_img_size=False)
        num_patches = (img_size // patch_size) ** 2
        self.time_embed = nn.Sequential(nn.Linear(dims, 4 * dims), nn.SiLU(), nn.Linear(4 * dims, dims)) \
            if mlp_time_embed else nn.Identity()
        self.label_emb = nn.Embedding(num_classes, dims) if num_classes > 0 else None
        self.extras = 2 if num_classes > 0 else 1
        self.pos_embed = nn.Parameter(torch.zeros(1, self.extras + num_patches, dims))
        block = dict(embed_dims=dims, num_heads=arch['num_heads'], mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                     backend=attention)
        self.in_blocks = nn.ModuleList(UViTBlock(**block) for _ in range(arch['depth'] // 2))
        self.mid_block = UViTBlock(**block)
        self.out_blocks = nn.ModuleList(UViTBlock(**block, skip=True) for _ in range(arch['depth'] // 2))
        self.norm = nn.LayerNorm(dims)
        self.decoder_pred = nn.Linear(dims, patch_size ** 2 * in_channels)
        use_conv = arch.get('conv', True) if conv is None else conv
        self.final_layer = nn.Conv2d(in_channels, in_channels, 3, padding=1) if use_conv else nn.Identity()

    def set_attention(self, backend: str):
        """Switch every block's attention backend ('sdpa', 'xformers', 'math') without touching the weights."""
        for module in self.modules():
            if isinstance(module, UViTAttention):
                module.backend = backend

    def default_init(self):
        init_vit_weights(self, self.pos_embed)

    def check_inputs(self, x: torch.Tensor, labels: Optional[torch.Tensor]):
        if x.shape[1] != self.in_channels or tuple(x.shape[-2:]) != (self.img_size, self.img_size):
            raise ValueError(f'UViT was built for {self.in_channels}x{self.img_size}x{self.img_size} inputs, got '
                             f'{tuple(x.shape[1:])}')
        if self.num_classes > 0:
            if labels is None:
                raise ValueError('this UViT is class-conditional: pass labels')
            # (a value check needs the data: it is skipped inside torch.compile / torch.export graphs)
            if not torch.compiler.is_compiling() and (labels.min() < 0 or labels.max() >= self.num_classes):
                raise ValueError(f'labels must lie in [0, {self.num_classes}); got values in '
                                 f'[{int(labels.min())}, {int(labels.max())}]')
        elif labels is not None:
            raise ValueError('this UViT is unconditional (num_classes=0); it takes no labels')

    def _block(self, block: UViTBlock, x: torch.Tensor, skip: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.with_cp and x.requires_grad:
            return cp.checkpoint(block, x, skip, use_reentrant=False)
        return block(x, skip)

    def forward_tokens(self, x: torch.Tensor, timesteps: torch.Tensor,
                       labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, C, H, W), (B,) -> final tokens (B, extras + N, D) after the out-blocks (before the norm)."""
        self.check_inputs(x, labels)
        x = self.patch_embed(x)
        time_token = self.time_embed(timestep_embedding(timesteps, self.embed_dims)).unsqueeze(1)
        x = torch.cat([time_token.to(x.dtype), x], dim=1)
        if self.label_emb is not None:
            x = torch.cat([self.label_emb(labels).unsqueeze(1).to(x.dtype), x], dim=1)
        return self.run_blocks(x + self.pos_embed)

    def run_blocks(self, x: torch.Tensor) -> torch.Tensor:
        """In-blocks, mid block, out-blocks with the long skips paired last in, first out. (B, N, D) -> (B, N, D)."""
        skips = []
        for block in self.in_blocks:
            x = self._block(block, x)
            skips.append(x)
        x = self._block(self.mid_block, x)
        for block in self.out_blocks:
            x = self._block(block, x, skips.pop())
        return x

    def unpatchify(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, N, p * p * C) with channels fastest -> (B, C, H, W)."""
        batch, num, _ = tokens.shape
        side, p, c = int(math.isqrt(num)), self.patch_size, self.in_channels
        x = tokens.reshape(batch, side, side, p, p, c).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(batch, c, side * p, side * p)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, labels: Optional[torch.Tensor] = None):
        """x_t (B, C, H, W), timesteps (B,) as the schedule feeds them, labels (B,) -> (B, C, H, W)."""
        tokens = self.decoder_pred(self.norm(self.forward_tokens(x, timesteps, labels)))
        return self.final_layer(self.unpatchify(tokens[:, self.extras:]))


class UViTBackbone(CheckpointLayoutMixin, BaseModule):
    """U-ViT as a dense-prediction backbone (mmseg): images (B, 3, H, W) -> one (B, C, H / p, W / p) map, in a tuple.

    The transformer sees RGB patches with the time token at a fixed timestep and no label; its final tokens form a
    single-scale map at stride ``patch_size``. A neck makes the pyramid a decode head wants, as for any plain ViT:
    :class:`~sparsevit_mm.models.SimpleFeaturePyramid` (scale factors 4, 2, 1, 0.5: strides 4-32 for patch 16; the
    shipped UperNet config).

    Args:
        arch / patch_size / attention / with_cp: as :class:`UViT`.
        img_size: the training crop; other sizes resize the position embedding.
        timestep: the fixed timestep of the time token.
        init_cfg: ``dict(type='Pretrained', checkpoint=...)`` with a U-ViT checkpoint (official or ours) loads the
            transformer.
    """

    def __init__(self, arch='small', img_size: int = 512, patch_size: int = 16, timestep: float = 0.0,
                 attention: str = 'sdpa', with_cp: bool = False, init_cfg=None):
        super().__init__(init_cfg=init_cfg)
        self.uvit = UViT(arch, img_size, patch_size, 3, num_classes=0, conv=False, attention=attention,
                         with_cp=with_cp)
        self.timestep = timestep
        self.embed_dims = self.uvit.embed_dims

    # A diffusion checkpoint brings the transformer blocks only (its patch embedding, head and size are its own).
    optional_checkpoint_groups = (r'^uvit\.(patch_embed|pos_embed|norm|decoder_pred|final_layer)\.', )

    def convert_checkpoint(self, state_dict, checkpoint=None):
        """A U-ViT diffusion checkpoint (ours: ``network.*``; official: plain) -> ``uvit.`` blocks; ours unchanged."""
        if any(k.startswith('uvit.') for k in state_dict):
            return dict(state_dict)
        network = {k[len('network.'):]: v for k, v in state_dict.items() if k.startswith('network.')} or state_dict
        return {f'uvit.{k}': v for k, v in network.items()
                if k.split('.')[0] in ('in_blocks', 'mid_block', 'out_blocks')}

    def forward(self, images: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        uvit = self.uvit
        height, width = images.shape[-2:]
        if height % uvit.patch_size or width % uvit.patch_size:
            raise ValueError(f'input size {height}x{width} is not a multiple of the patch size {uvit.patch_size}')
        grid = (height // uvit.patch_size, width // uvit.patch_size)
        x = uvit.patch_embed(images)
        timesteps = images.new_full((images.shape[0], ), self.timestep)
        time_token = timestep_embedding(timesteps, self.embed_dims).unsqueeze(1).to(x.dtype)
        pos_embed = uvit.pos_embed
        train_side = uvit.img_size // uvit.patch_size
        if grid != (train_side, train_side):
            patches = pos_embed[:, 1:].reshape(1, train_side, train_side, -1).permute(0, 3, 1, 2)
            patches = F.interpolate(patches, size=grid, mode='bicubic', align_corners=False)
            pos_embed = torch.cat([pos_embed[:, :1], patches.flatten(2).transpose(1, 2)], dim=1)
        x = uvit.run_blocks(torch.cat([time_token, x], dim=1) + pos_embed)
        return (x[:, 1:].transpose(1, 2).reshape(images.shape[0], -1, *grid), )


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoint layouts: official U-ViT checkpoints (plain state dicts, e.g. ``nnet_ema.pth``) -> UViTDiffusion ones
#
# Our ``UViT`` keeps the official module names, so the network's keys are unchanged; they move under ``network.``.
# ---------------------------------------------------------------------------------------------------------------------

_HEADS_BY_WIDTH = {512: 8, 768: 12, 1024: 16, 1152: 16}


def infer_uvit_network(state_dict: StateDict, num_heads: Optional[int] = None) -> Tuple[dict, List[str]]:
    """The ``UViT`` config read off an official state dict's shapes, and notes on what had to be inferred.

    Checkpoints do not record the head count: it comes from ``num_heads``, else from the official width -> heads
    table, else 64 channels per head (noted).
    """
    try:
        patch = state_dict['patch_embed.proj.weight']
        dims, in_channels, patch_size = patch.shape[0], patch.shape[1], patch.shape[-1]
        depth = 2 * (1 + max(int(k.split('.')[1]) for k in state_dict if k.startswith('in_blocks.')))
        num_classes = state_dict['label_emb.weight'].shape[0] if 'label_emb.weight' in state_dict else 0
        extras = 2 if num_classes else 1
        side = int(round((state_dict['pos_embed'].shape[1] - extras) ** 0.5))
    except (KeyError, ValueError) as error:
        raise CheckpointMismatchError(f'cannot read the U-ViT arch off this checkpoint: missing {error}') from error
    if 'context_embed.weight' in state_dict:
        raise CheckpointMismatchError('text-to-image U-ViT checkpoints (context_embed) are not supported yet')
    notes = []
    if num_heads is None:
        num_heads = _HEADS_BY_WIDTH.get(dims)
    if num_heads is None:
        num_heads = max(1, dims // 64)
        notes.append(f'num_heads={num_heads} was inferred from the width {dims} (64 channels per head): checkpoints '
                     'do not record the head count, and this width is not one of the official U-ViTs '
                     f'({sorted(_HEADS_BY_WIDTH)}); pass --num-heads if the model was trained with another')
    if dims % num_heads:
        raise ValueError(f'num_heads={num_heads} does not divide the width {dims}')
    arch = dict(embed_dims=dims, depth=depth, num_heads=num_heads)
    return dict(type='UViT', arch=arch, img_size=side * patch_size, patch_size=patch_size, in_channels=in_channels,
                num_classes=num_classes, conv='final_layer.weight' in state_dict,
                mlp_time_embed='time_embed.0.weight' in state_dict), notes


def official_uvit_to_ours(state_dict: StateDict) -> StateDict:
    """An official plain U-ViT state dict -> :class:`UViTDiffusion` keys (``network.*``); ours pass unchanged."""
    if any(k.startswith('in_blocks.') for k in state_dict):
        return {f'network.{k}': v for k, v in state_dict.items()}
    return dict(state_dict)
