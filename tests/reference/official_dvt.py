"""Independent functional re-statement of the official DVT forward (all three exits) on an official state dict.

Written from ``../shared/research/dvt_uvit.md`` part A (tokenizers, reuse paths, resampling order, key names).
"""
import math

import torch
import torch.nn.functional as F

GRIDS = (7, 10, 14)
PREFIXES = ('less_less_token.', 'less_token.', 'normal_token.')


def _ln(x, sd, p, eps):
    return F.layer_norm(x, x.shape[-1:], sd[p + '.weight'], sd[p + '.bias'], eps)


def _lin(x, sd, p):
    return F.linear(x, sd[p + '.weight'], sd.get(p + '.bias'))


def _up(x, size):
    return F.adaptive_avg_pool2d(F.interpolate(x, scale_factor=2, mode='nearest'), size)


def _performer(x, sd, p):
    kqv = _lin(_ln(x, sd, p + '.norm1', 1e-5), sd, p + '.kqv')
    emb = kqv.shape[-1] // 3
    k, q, v = kqv[..., :emb], kqv[..., emb:2 * emb], kqv[..., 2 * emb:]
    w = sd[p + '.w']
    m = w.shape[0]

    def prm(t):
        return torch.exp(torch.einsum('bti,mi->btm', t, w) - (t * t).sum(-1, keepdim=True) / 2) / math.sqrt(m)

    kp, qp = prm(k), prm(q)
    d = torch.einsum('bti,bi->bt', qp, kp.sum(1)).unsqueeze(2)
    kptv = torch.einsum('bin,bim->bnm', v, kp)
    y = torch.einsum('bti,bni->btn', qp, kptv) / (d + 1e-8)
    y = v + _lin(y, sd, p + '.proj')
    h = _ln(y, sd, p + '.norm2', 1e-5)
    return y + _lin(F.gelu(_lin(h, sd, p + '.mlp.0')), sd, p + '.mlp.2')


def _tokens(images, sd, p, grid, t2t):
    if t2t:
        k, s, pad = {7: (14, 8, 3), 10: (11, 6, 5), 14: (7, 4, 2)}[grid]
        x = _performer(F.unfold(images, k, stride=s, padding=pad).transpose(1, 2), sd, p + 'tokens_to_token.attention1')
        for i in (2, None):
            b, n, c = x.shape
            side = int(math.isqrt(n))
            x = F.unfold(x.transpose(1, 2).reshape(b, c, side, side), 3, stride=2, padding=1).transpose(1, 2)
            if i:
                x = _performer(x, sd, p + 'tokens_to_token.attention2')
        return _lin(x, sd, p + 'tokens_to_token.project')
    k, pad = {7: (32, 0), 10: (23, 3), 14: (16, 0)}[grid]
    w = sd[p + 'patch_embed.proj.weight']
    return F.conv2d(images, w, sd[p + 'patch_embed.proj.bias'], k, pad).flatten(2).transpose(1, 2)


@torch.no_grad()
def official_dvt_forward(sd, images, depth, heads, t2t):
    eps = 1e-5 if t2t else 1e-6
    logits_out, prev_tokens, prev_rel = [], None, None
    for e, (p, grid) in enumerate(zip(PREFIXES, GRIDS)):
        x = _tokens(images, sd, p, grid, t2t)
        b = x.shape[0]
        x = torch.cat([sd[p + 'cls_token'].expand(b, -1, -1), x], 1) + sd[p + 'pos_embed']
        reused_rel = None
        if e > 0:
            r = torch.cat(prev_rel, 1)
            r = F.conv2d(F.gelu(F.conv2d(r, sd[p + 'relation_reuse_conv.0.weight'], sd[p + 'relation_reuse_conv.0.bias'])),
                         sd[p + 'relation_reuse_conv.2.weight'], sd[p + 'relation_reuse_conv.2.bias'])
            bb, ch, n, _ = r.shape
            side = int(math.isqrt(n - 1))
            r = r.reshape(bb * ch, n, n)
            keys = _up(r[:, :, 1:].reshape(-1, n, side, side), grid).flatten(2)
            r = torch.cat([r[:, :, :1], keys], 2).transpose(1, 2)
            queries = _up(r[:, :, 1:].reshape(-1, grid * grid + 1, side, side), grid).flatten(2)
            r = torch.cat([r[:, :, :1], queries], 2).transpose(1, 2)
            reused_rel = r.reshape(bb, ch, grid * grid + 1, grid * grid + 1).split(heads, 1)
        rels = []
        for i in range(depth):
            bp = f'{p}blocks.{i}'
            h = _ln(x, sd, bp + '.norm1', eps)
            n, c = h.shape[1], h.shape[2]
            qkv = _lin(h, sd, bp + '.attn.qkv').reshape(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
            a = (qkv[0] @ qkv[1].transpose(-2, -1)) * (c // heads) ** -0.5
            if reused_rel is not None:
                a = a + reused_rel[i]
            rels.append(a)
            x = x + _lin((a.softmax(-1) @ qkv[2]).transpose(1, 2).reshape(b, n, c), sd, bp + '.attn.proj')
            z = x
            if e > 0:
                f = _ln(prev_tokens, sd, bp + '.feature_resuse_mlp.0', eps)
                f = _lin(F.gelu(_lin(f, sd, bp + '.feature_resuse_mlp.1.fc1')), sd, bp + '.feature_resuse_mlp.1.fc2')
                f = f[:, 1:]
                side = int(math.isqrt(f.shape[1]))
                f = _up(f.transpose(1, 2).reshape(b, -1, side, side), grid).flatten(2).transpose(1, 2)
                z = torch.cat([x, torch.cat([f.new_zeros(b, 1, f.shape[-1]), f], 1)], -1)
            x = x + _lin(F.gelu(_lin(_ln(z, sd, bp + '.norm2', eps), sd, bp + '.mlp.fc1')), sd, bp + '.mlp.fc2')
        prev_tokens, prev_rel = x, rels
        logits_out.append(_lin(_ln(x, sd, p + 'norm', eps)[:, 0], sd, p + 'head'))
    return logits_out


def official_dvt_state_dict(model_state_dict_of_ours):
    """Rename a random-init state dict of ours into the official layout (test fixture; keys only)."""
    names = {0: 'less_less_token.', 1: 'less_token.', 2: 'normal_token.'}
    out = {}
    for key, value in model_state_dict_of_ours.items():
        if key.startswith('heads.'):
            _, k, rest = key.split('.', 2)
            out[f'{names[int(k)]}head.{rest}'] = value
        elif key.startswith('exits.'):
            _, k, rest = key.split('.', 2)
            rest = (rest.replace('tokenizer.mixer1.', 'tokens_to_token.attention1.')
                    .replace('tokenizer.mixer2.', 'tokens_to_token.attention2.')
                    .replace('tokenizer.project.', 'tokens_to_token.project.')
                    .replace('tokenizer.proj.', 'patch_embed.proj.')
                    .replace('.feature_reuse.', '.feature_resuse_mlp.').replace('relation_reuse.', 'relation_reuse_conv.')
                    .replace('.random_features', '.w'))
            out[f'{names[int(k)]}{rest}'] = value
    return out
