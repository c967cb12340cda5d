"""Independent functional re-statement of the official U-ViT forward on an official state dict.

From ``../shared/research/dvt_uvit.md`` part B.1: tokens [label, time, patches] + pos_embed, cos-first time sinusoid,
LIFO long skips with Linear(concat[current, skip]), LN -> decoder_pred -> "(p1 p2 C)" unpatchify -> 3x3 conv.
"""
import math

import torch
import torch.nn.functional as F


def _ln(x, sd, p):
    return F.layer_norm(x, x.shape[-1:], sd[p + '.weight'], sd[p + '.bias'], 1e-5)


def _lin(x, sd, p):
    return F.linear(x, sd[p + '.weight'], sd.get(p + '.bias'))


def _block(x, sd, p, heads, skip=None):
    if skip is not None:
        x = _lin(torch.cat([x, skip], -1), sd, p + '.skip_linear')
    b, n, c = x.shape
    qkv = _lin(_ln(x, sd, p + '.norm1'), sd, p + '.attn.qkv').reshape(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
    a = ((qkv[0] @ qkv[1].transpose(-2, -1)) * (c // heads) ** -0.5).softmax(-1)
    x = x + _lin((a @ qkv[2]).transpose(1, 2).reshape(b, n, c), sd, p + '.attn.proj')
    return x + _lin(F.gelu(_lin(_ln(x, sd, p + '.norm2'), sd, p + '.mlp.fc1')), sd, p + '.mlp.fc2')


@torch.no_grad()
def official_uvit_forward(sd, x, timesteps, labels, heads, patch):
    b, c = x.shape[:2]
    dims = sd['pos_embed'].shape[-1]
    tokens = F.conv2d(x, sd['patch_embed.proj.weight'], sd['patch_embed.proj.bias'], stride=patch).flatten(2).transpose(1, 2)
    half = dims // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = timesteps[:, None].float() * freqs[None]
    time_token = torch.cat([torch.cos(args), torch.sin(args)], -1)[:, None]
    tokens = torch.cat([time_token, tokens], 1)
    extras = 1
    if labels is not None:
        tokens = torch.cat([sd['label_emb.weight'][labels][:, None], tokens], 1)
        extras = 2
    tokens = tokens + sd['pos_embed']
    depth = 1 + max(int(k.split('.')[1]) for k in sd if k.startswith('in_blocks.'))
    skips = []
    for i in range(depth):
        tokens = _block(tokens, sd, f'in_blocks.{i}', heads)
        skips.append(tokens)
    tokens = _block(tokens, sd, 'mid_block', heads)
    for i in range(depth):
        tokens = _block(tokens, sd, f'out_blocks.{i}', heads, skips.pop())
    out = _lin(_ln(tokens, sd, 'norm'), sd, 'decoder_pred')[:, extras:]
    side = int(math.isqrt(out.shape[1]))
    out = out.reshape(b, side, side, patch, patch, c).permute(0, 5, 1, 3, 2, 4).reshape(b, c, side * patch,
                                                                                   side * patch)
    if 'final_layer.weight' in sd:
        out = F.conv2d(out, sd['final_layer.weight'], sd['final_layer.bias'], padding=1)
    return out
