"""Independent functional re-statement of the official DynamicCNN (ConvNeXt) and DynamicSwin inference forwards.

Written from the description of the official code (``../shared/research/dynamicvit.md`` sections 4.1-4.5 and the
ConvNeXt / Swin papers): official key names, channels-first LayerNorm and 1x1-conv predictors for ConvNeXt, the
official Swin window attention and concatenating patch merging, argsort splits with int(N * ratio) slow positions,
ratios [r, r - 0.2, r - 0.4]. Used only to check our converted models against it.
"""
import math

import torch
import torch.nn.functional as F


def _ln(x, sd, prefix, eps):
    return F.layer_norm(x, x.shape[-1:], sd[prefix + '.weight'], sd[prefix + '.bias'], eps)


def _ln_channels_first(x, sd, prefix, eps=1e-6):
    return _ln(x.permute(0, 2, 3, 1), sd, prefix, eps).permute(0, 3, 1, 2)


def _linear(x, sd, prefix):
    return F.linear(x, sd[prefix + '.weight'], sd.get(prefix + '.bias'))


def _fill(n, idx1, y1, idx2, y2):
    out = y1.new_zeros(y1.shape[0], n, y1.shape[-1])
    out.scatter_(1, idx1[..., None].expand_as(y1), y1)
    out.scatter_(1, idx2[..., None].expand_as(y2), y2)
    return out


def _split(scores, ratio):
    idx = torch.argsort(scores, dim=1, descending=True)
    k = int(scores.shape[1] * ratio)
    return idx[:, :k], idx[:, k:]


# ----------------------------------------------------------------------------------------------- ConvNeXt
def _conv_predictor(x, sd, prefix):
    """Official ConvNeXt PredictorLG on a (B, C, H, W) map -> keep scores (B, H*W)."""
    x = _ln_channels_first(x, sd, prefix + '.in_conv.0')
    x = F.gelu(F.conv2d(x, sd[prefix + '.in_conv.1.weight'], sd[prefix + '.in_conv.1.bias']))
    c = x.shape[1]
    local, glob = x[:, :c // 2], x[:, c // 2:].mean(dim=(2, 3), keepdim=True)
    x = torch.cat([local, glob.expand_as(local)], dim=1)
    x = F.gelu(F.conv2d(x, sd[prefix + '.out_conv.0.weight'], sd[prefix + '.out_conv.0.bias']))
    x = F.gelu(F.conv2d(x, sd[prefix + '.out_conv.2.weight'], sd[prefix + '.out_conv.2.bias']))
    x = F.log_softmax(F.conv2d(x, sd[prefix + '.out_conv.4.weight'], sd[prefix + '.out_conv.4.bias']), dim=1)
    return x[:, 0].flatten(1)


@torch.no_grad()
def official_convnext_forward(sd, images, depths, pruning_loc=(1, 2, 3), base_rate=0.7):
    ratios = [base_rate, base_rate - 0.2, base_rate - 0.4]
    x = images
    for i in range(4):
        ds = f'downsample_layers.{i}'
        if i == 0:
            x = F.conv2d(x, sd[ds + '.0.weight'], sd[ds + '.0.bias'], stride=4)
            x = _ln_channels_first(x, sd, ds + '.1')
        else:
            x = _ln_channels_first(x, sd, ds + '.0')
            x = F.conv2d(x, sd[ds + '.1.weight'], sd[ds + '.1.bias'], stride=2)
        split = None
        for j in range(depths[i]):
            p = f'stages.{i}.{j}'
            if i == 2 and j in pruning_loc:
                s = pruning_loc.index(j)
                split = _split(_conv_predictor(x, sd, f'score_predictor.{s}'), ratios[s])
            c = x.shape[1]
            d = F.conv2d(x, sd[p + '.dwconv.weight'], sd[p + '.dwconv.bias'], padding=3, groups=c)
            b, _, h, w = d.shape
            tokens = d.permute(0, 2, 3, 1).reshape(b, h * w, c)

            def slow(t):
                t = _linear(F.gelu(_linear(_ln(t, sd, p + '.norm', 1e-6), sd, p + '.pwconv1')), sd, p + '.pwconv2')
                return t * sd[p + '.gamma']

            if split is None:
                y = slow(tokens)
            else:
                idx1, idx2 = split
                t1 = torch.gather(tokens, 1, idx1[..., None].expand(-1, -1, c))
                t2 = torch.gather(tokens, 1, idx2[..., None].expand(-1, -1, c))
                y2 = _linear(_ln(t2, sd, p + '.fast_path.0', 1e-6), sd, p + '.fast_path.1') * sd[p + '.fast_path_gamma']
                y = _fill(h * w, idx1, slow(t1), idx2, y2)
            x = x + y.reshape(b, h, w, c).permute(0, 3, 1, 2)
    x = _ln(x.mean(dim=(2, 3)), sd, 'norm', 1e-6)
    return _linear(x, sd, 'head')


def random_official_convnext(depths, channels, num_classes=5, predictors=True, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, std=0.02):
        return torch.randn(*shape, generator=g) * std

    def norm(prefix, c):
        sd[prefix + '.weight'] = 1 + rand(c, std=0.1)
        sd[prefix + '.bias'] = rand(c, std=0.1)

    sd = {}
    for i, c in enumerate(channels):
        ds = f'downsample_layers.{i}'
        if i == 0:
            sd[ds + '.0.weight'], sd[ds + '.0.bias'] = rand(c, 3, 4, 4, std=0.2), rand(c)
            norm(ds + '.1', c)
        else:
            norm(ds + '.0', channels[i - 1])
            sd[ds + '.1.weight'] = rand(c, channels[i - 1], 2, 2, std=1 / math.sqrt(4 * channels[i - 1]))
            sd[ds + '.1.bias'] = rand(c)
        for j in range(depths[i]):
            p = f'stages.{i}.{j}'
            sd[p + '.dwconv.weight'], sd[p + '.dwconv.bias'] = rand(c, 1, 7, 7, std=0.1), rand(c)
            norm(p + '.norm', c)
            sd[p + '.pwconv1.weight'], sd[p + '.pwconv1.bias'] = rand(4 * c, c, std=1 / math.sqrt(c)), rand(4 * c)
            sd[p + '.pwconv2.weight'] = rand(c, 4 * c, std=1 / math.sqrt(4 * c))
            sd[p + '.pwconv2.bias'] = rand(c)
            sd[p + '.gamma'] = 0.5 + rand(c, std=0.1)
            if predictors and i == 2 and j >= 1:
                norm(p + '.fast_path.0', c)
                sd[p + '.fast_path.1.weight'] = rand(c, c, std=1 / math.sqrt(c))
                sd[p + '.fast_path.1.bias'] = rand(c)
                sd[p + '.fast_path_gamma'] = 0.5 + rand(c, std=0.1)
    norm('norm', channels[-1])
    sd['head.weight'], sd['head.bias'] = rand(num_classes, channels[-1], std=0.1), rand(num_classes)
    if predictors:
        c = channels[2]
        for s in range(3):
            p = f'score_predictor.{s}'
            norm(p + '.in_conv.0', c)
            for name, (cout, cin) in {'in_conv.1': (c, c), 'out_conv.0': (c // 2, c), 'out_conv.2': (c // 4, c // 2),
                                      'out_conv.4': (2, c // 4)}.items():
                sd[f'{p}.{name}.weight'] = rand(cout, cin, 1, 1, std=1 / math.sqrt(cin))
                sd[f'{p}.{name}.bias'] = rand(cout, std=0.1)
    return sd


# ----------------------------------------------------------------------------------------------- Swin
def _relative_index(ws):
    coords = torch.stack(torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing='ij')).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (ws - 1)
    return rel[..., 0] * (2 * ws - 1) + rel[..., 1]


def _windows(x, ws):
    b, h, w, c = x.shape
    return x.view(b, h // ws, ws, w // ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, ws * ws, c)


def _unwindows(x, ws, b, h, w):
    return x.view(b, h // ws, w // ws, ws, ws, -1).permute(0, 1, 3, 2, 4, 5).reshape(b, h, w, -1)


def _shift_mask(h, w, ws, shift):
    img = torch.zeros(1, h, w, 1)
    cnt = 0
    for hs in (slice(0, -ws), slice(-ws, -shift), slice(-shift, None)):
        for wsl in (slice(0, -ws), slice(-ws, -shift), slice(-shift, None)):
            img[:, hs, wsl] = cnt
            cnt += 1
    win = _windows(img, ws).squeeze(-1)
    mask = win[:, None, :] - win[:, :, None]
    return mask.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0)


def _swin_attention(x, sd, p, heads, ws, shift, h, w):
    b, n, c = x.shape
    x = x.view(b, h, w, c)
    if shift:
        x = torch.roll(x, (-shift, -shift), (1, 2))
    win = _windows(x, ws)
    qkv = _linear(win, sd, p + '.attn.qkv').reshape(win.shape[0], ws * ws, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0] * (c // heads) ** -0.5, qkv[1], qkv[2]
    attn = q @ k.transpose(-2, -1)
    bias = sd[p + '.attn.relative_position_bias_table'][_relative_index(ws).flatten()]
    attn = attn + bias.view(ws * ws, ws * ws, heads).permute(2, 0, 1)[None]
    if shift:
        mask = _shift_mask(h, w, ws, shift)
        nw = mask.shape[0]
        attn = attn.view(-1, nw, heads, ws * ws, ws * ws) + mask[None, :, None]
        attn = attn.view(-1, heads, ws * ws, ws * ws)
    out = (attn.softmax(-1) @ v).transpose(1, 2).reshape(-1, ws * ws, c)
    out = _unwindows(_linear(out, sd, p + '.attn.proj'), ws, b, h, w)
    if shift:
        out = torch.roll(out, (shift, shift), (1, 2))
    return out.reshape(b, n, c)


def _token_predictor(x, sd, prefix):
    x = F.gelu(_linear(_ln(x, sd, prefix + '.in_conv.0', 1e-5), sd, prefix + '.in_conv.1'))
    c = x.shape[-1]
    local, glob = x[..., :c // 2], x[..., c // 2:].mean(dim=1, keepdim=True)
    x = torch.cat([local, glob.expand_as(local)], dim=-1)
    x = F.gelu(_linear(x, sd, prefix + '.out_conv.0'))
    x = F.gelu(_linear(x, sd, prefix + '.out_conv.2'))
    return F.log_softmax(_linear(x, sd, prefix + '.out_conv.4'), dim=-1)[..., 0]


@torch.no_grad()
def official_swin_forward(sd, images, depths, heads, ws=7, pruning_loc=(1, 2, 3), base_rate=0.7):
    ratios = [base_rate, base_rate - 0.2, base_rate - 0.4]
    x = F.conv2d(images, sd['patch_embed.proj.weight'], sd['patch_embed.proj.bias'], stride=4)
    b, c, h, w = x.shape
    x = _ln(x.flatten(2).transpose(1, 2), sd, 'patch_embed.norm', 1e-5)
    for i in range(4):
        split = None
        for j in range(depths[i]):
            p = f'layers.{i}.blocks.{j}'
            if i == 2 and j in pruning_loc:
                s = pruning_loc.index(j)
                split = _split(_token_predictor(x, sd, f'layers.2.score_predictor.{s}'), ratios[s])
            shift = 0 if (j % 2 == 0 or min(h, w) <= ws) else ws // 2
            x = x + _swin_attention(_ln(x, sd, p + '.norm1', 1e-5), sd, p, heads[i], min(ws, h, w), shift, h, w)

            def slow(t):
                return t + _linear(F.gelu(_linear(_ln(t, sd, p + '.norm2', 1e-5), sd, p + '.mlp.fc1')), sd,
                                   p + '.mlp.fc2')

            if split is None:
                x = slow(x)
            else:
                idx1, idx2 = split
                cc = x.shape[-1]
                t1 = torch.gather(x, 1, idx1[..., None].expand(-1, -1, cc))
                t2 = torch.gather(x, 1, idx2[..., None].expand(-1, -1, cc))
                y2 = t2 + _linear(_ln(t2, sd, p + '.fastmlp.fc1.0', 1e-5), sd, p + '.fastmlp.fc1.1')
                x = _fill(h * w, idx1, slow(t1), idx2, y2)
        if i < 3:
            p = f'layers.{i}.downsample'
            v = x.view(b, h, w, -1)
            v = torch.cat([v[:, 0::2, 0::2], v[:, 1::2, 0::2], v[:, 0::2, 1::2], v[:, 1::2, 1::2]], -1)
            h, w = h // 2, w // 2
            x = _linear(_ln(v.view(b, h * w, -1), sd, p + '.norm', 1e-5), sd, p + '.reduction')
    x = _ln(x, sd, 'norm', 1e-5).mean(1)
    return _linear(x, sd, 'head')


def random_official_swin(embed_dims, depths, num_heads, ws=7, num_classes=5, predictors=True, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, std=0.02):
        return torch.randn(*shape, generator=g) * std

    def norm(prefix, c):
        sd[prefix + '.weight'] = 1 + rand(c, std=0.1)
        sd[prefix + '.bias'] = rand(c, std=0.1)

    def linear(prefix, cout, cin, bias=True):
        sd[prefix + '.weight'] = rand(cout, cin, std=1 / math.sqrt(cin))
        if bias:
            sd[prefix + '.bias'] = rand(cout, std=0.05)

    sd = {'patch_embed.proj.weight': rand(embed_dims, 3, 4, 4, std=0.2), 'patch_embed.proj.bias': rand(embed_dims)}
    norm('patch_embed.norm', embed_dims)
    c = embed_dims
    for i in range(4):
        for j in range(depths[i]):
            p = f'layers.{i}.blocks.{j}'
            norm(p + '.norm1', c)
            sd[p + ".attn.relative_position_bias_table"] = rand((2 * ws - 1) ** 2, num_heads[i], std=0.5)
            sd[p + '.attn.relative_position_index'] = _relative_index(ws)
            linear(p + '.attn.qkv', 3 * c, c)
            linear(p + '.attn.proj', c, c)
            norm(p + '.norm2', c)
            linear(p + '.mlp.fc1', 4 * c, c)
            linear(p + '.mlp.fc2', c, 4 * c)
            if predictors and i == 2 and j >= 1:
                norm(p + '.fastmlp.fc1.0', c)
                linear(p + '.fastmlp.fc1.1', c, c)
        if i < 3:
            norm(f'layers.{i}.downsample.norm', 4 * c)
            linear(f'layers.{i}.downsample.reduction', 2 * c, 4 * c, bias=False)
            c *= 2
    norm('norm', c)
    linear('head', num_classes, c)
    if predictors:
        c3 = embed_dims * 4
        for s in range(3):
            p = f'layers.2.score_predictor.{s}'
            norm(p + '.in_conv.0', c3)
            for name, (cout, cin) in {'in_conv.1': (c3, c3), 'out_conv.0': (c3 // 2, c3),
                                      'out_conv.2': (c3 // 4, c3 // 2), 'out_conv.4': (2, c3 // 4)}.items():
                linear(f'{p}.{name}', cout, cin)
    return sd
