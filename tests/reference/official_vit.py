"""Independent functional re-statement of the official DynamicViT / LV-ViT inference forward.

Written from the description of the official code (``../shared/research/dynamicvit.md``: predictor, keep counts,
argsort + ``batch_index_select``, attention with the scale after the matmul, LV-ViT skip_lam and aux head), working
directly on an official-layout state dict. Used only to check that our converted models give the same outputs.
"""
import math

import torch
import torch.nn.functional as F


def _ln(x, sd, prefix, eps):
    return F.layer_norm(x, x.shape[-1:], sd[prefix + '.weight'], sd[prefix + '.bias'], eps)


def _linear(x, sd, prefix):
    return F.linear(x, sd[prefix + '.weight'], sd.get(prefix + '.bias'))


def _index_select(x, idx):
    # The official batch_index_select: flatten the batch and offset the indices by b * N.
    b, n = x.shape[:2]
    offset = torch.arange(b, device=x.device).view(b, 1) * n
    flat = (idx + offset).reshape(-1)
    return x.reshape(b * n, *x.shape[2:])[flat].reshape(b, idx.shape[1], *x.shape[2:])


def _predictor(x, policy, sd, prefix):
    x = F.gelu(_linear(_ln(x, sd, prefix + '.in_conv.0', 1e-5), sd, prefix + '.in_conv.1'))
    c = x.shape[-1]
    local_x = x[:, :, :c // 2]
    global_x = (x[:, :, c // 2:] * policy).sum(dim=1, keepdim=True) / torch.sum(policy, dim=1, keepdim=True)
    x = torch.cat([local_x, global_x.expand(-1, x.shape[1], -1)], dim=-1)
    x = F.gelu(_linear(x, sd, prefix + '.out_conv.0'))
    x = F.gelu(_linear(x, sd, prefix + '.out_conv.2'))
    return F.log_softmax(_linear(x, sd, prefix + '.out_conv.4'), dim=-1)


def _block(x, sd, prefix, heads, skip_lam):
    b, n, c = x.shape
    h = _ln(x, sd, prefix + '.norm1', 1e-6)
    qkv = _linear(h, sd, prefix + '.attn.qkv').reshape(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    attn = (q @ k.transpose(-2, -1)) * (c // heads) ** -0.5
    h = (attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, n, c)
    x = x + _linear(h, sd, prefix + '.attn.proj') / skip_lam
    h = _ln(x, sd, prefix + '.norm2', 1e-6)
    h = _linear(F.gelu(_linear(h, sd, prefix + '.mlp.fc1')), sd, prefix + '.mlp.fc2')
    return x + h / skip_lam


def _lvvit_stem(x, sd):
    for i, (stride, pad) in enumerate(((2, 3), (1, 1), (1, 1)), start=1):
        x = F.conv2d(x, sd[f'patch_embed.conv{i}.weight'], None, stride, pad)
        bn = f'patch_embed.bn{i}'
        x = F.relu(F.batch_norm(x, sd[bn + '.running_mean'], sd[bn + '.running_var'], sd[bn + '.weight'],
                                sd[bn + '.bias'], False, 0.0, 1e-5))
    w = sd['patch_embed.proj.weight']
    return F.conv2d(x, w, sd['patch_embed.proj.bias'], w.shape[-1])


@torch.no_grad()
def official_forward(sd, images, num_heads, pruning_loc=(3, 6, 9), base_rate=0.7, lvvit=False):
    """Logits of the official eval forward (``model.eval()(images)``) for an official-layout state dict."""
    if lvvit:
        x = _lvvit_stem(images, sd)
    else:
        w = sd['patch_embed.proj.weight']
        x = F.conv2d(images, w, sd['patch_embed.proj.bias'], w.shape[-1])
    x = x.flatten(2).transpose(1, 2)
    b, n = x.shape[:2]
    x = torch.cat([sd['cls_token'].expand(b, -1, -1), x], dim=1) + sd['pos_embed']
    depth = 1 + max(int(k.split('.')[1]) for k in sd if k.startswith('blocks.'))
    token_ratio = [base_rate, base_rate ** 2, base_rate ** 3]
    prev_decision = torch.ones(b, n, 1)
    p_count = 0
    for i in range(depth):
        if i in pruning_loc:
            spatial_x = x[:, 1:]
            pred_score = _predictor(spatial_x, prev_decision, sd, f'score_predictor.{p_count}')[:, :, 0]
            num_keep_node = int(n * token_ratio[p_count])
            keep_policy = torch.argsort(pred_score, dim=1, descending=True)[:, :num_keep_node]
            cls_policy = torch.zeros(b, 1, dtype=keep_policy.dtype)
            now_policy = torch.cat([cls_policy, keep_policy + 1], dim=1)
            x = _index_select(x, now_policy)
            prev_decision = _index_select(prev_decision, keep_policy)
            p_count += 1
        x = _block(x, sd, f'blocks.{i}', num_heads, 2.0 if lvvit else 1.0)
    x = _ln(x, sd, 'norm', 1e-6)
    logits = _linear(x[:, 0], sd, 'head')
    if lvvit:
        aux = _linear(x[:, 1:], sd, 'aux_head')
        logits = logits + 0.5 * aux.max(1)[0]
    return logits


def random_official_state_dict(embed_dims, depth, mlp_ratio=4.0, num_classes=10, lvvit=False, grid=14,
                               predictors=True, seed=0):
    """A random-weight checkpoint in the official DynamicViT (or LV-ViT) layout."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, std=0.02):
        return torch.randn(*shape, generator=g) * std

    c, hidden = embed_dims, int(embed_dims * mlp_ratio)
    sd = {'cls_token': rand(1, 1, c), 'pos_embed': rand(1, grid * grid + 1, c)}
    if lvvit:
        for i, cin in ((1, 3), (2, 64), (3, 64)):
            k = 7 if i == 1 else 3
            sd[f'patch_embed.conv{i}.weight'] = rand(64, cin, k, k, std=1 / math.sqrt(cin * k * k))
            sd[f'patch_embed.bn{i}.weight'] = 1 + rand(64, std=0.1)
            sd[f'patch_embed.bn{i}.bias'] = rand(64, std=0.1)
            sd[f'patch_embed.bn{i}.running_mean'] = rand(64, std=0.1)
            sd[f'patch_embed.bn{i}.running_var'] = 1 + torch.rand(64, generator=g)
            sd[f'patch_embed.bn{i}.num_batches_tracked'] = torch.tensor(100)
        sd['patch_embed.proj.weight'] = rand(c, 64, 8, 8, std=0.05)
    else:
        sd['patch_embed.proj.weight'] = rand(c, 3, 16, 16, std=0.05)
    sd['patch_embed.proj.bias'] = rand(c)
    for i in range(depth):
        p = f'blocks.{i}'
        for norm in ('norm1', 'norm2'):
            sd[f'{p}.{norm}.weight'] = 1 + rand(c, std=0.1)
            sd[f'{p}.{norm}.bias'] = rand(c, std=0.1)
        sd[f'{p}.attn.qkv.weight'] = rand(3 * c, c, std=0.05)
        if not lvvit:
            sd[f'{p}.attn.qkv.bias'] = rand(3 * c)
        sd[f'{p}.attn.proj.weight'] = rand(c, c, std=0.05)
        sd[f'{p}.attn.proj.bias'] = rand(c)
        sd[f'{p}.mlp.fc1.weight'] = rand(hidden, c, std=0.05)
        sd[f'{p}.mlp.fc1.bias'] = rand(hidden)
        sd[f'{p}.mlp.fc2.weight'] = rand(c, hidden, std=0.05)
        sd[f'{p}.mlp.fc2.bias'] = rand(c)
    sd['norm.weight'] = 1 + rand(c, std=0.1)
    sd['norm.bias'] = rand(c, std=0.1)
    sd['head.weight'] = rand(num_classes, c, std=0.1)
    sd['head.bias'] = rand(num_classes)
    if lvvit:
        sd['aux_head.weight'] = rand(num_classes, c, std=0.1)
        sd['aux_head.bias'] = rand(num_classes)
    if predictors:
        for s in range(3):
            p = f'score_predictor.{s}'
            sd[f'{p}.in_conv.0.weight'] = 1 + rand(c, std=0.1)
            sd[f'{p}.in_conv.0.bias'] = rand(c, std=0.1)
            for name, (cout, cin) in {'in_conv.1': (c, c), 'out_conv.0': (c // 2, c), 'out_conv.2': (c // 4, c // 2),
                                      'out_conv.4': (2, c // 4)}.items():
                sd[f'{p}.{name}.weight'] = rand(cout, cin, std=1 / math.sqrt(cin))
                sd[f'{p}.{name}.bias'] = rand(cout, std=0.1)
    return sd
