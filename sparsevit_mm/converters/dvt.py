"""Official DVT checkpoints (``model_state_dict``, ``flops``, ``dynamic_threshold`` ...) -> the :class:`DVT` layout."""
import re
from typing import Dict, Tuple

import torch

from ..utils.checkpoint import CheckpointMismatchError

StateDict = Dict[str, torch.Tensor]
_EXITS = (('less_less_token.', 0), ('less_token.', 1), ('normal_token.', 2))
_RENAMES = (('tokens_to_token.attention1.', 'tokenizer.mixer1.'), ('tokens_to_token.attention2.', 'tokenizer.mixer2.'),
            ('tokens_to_token.project.', 'tokenizer.project.'), ('patch_embed.proj.', 'tokenizer.proj.'),
            ('.feature_resuse_mlp.', '.feature_reuse.'), ('relation_reuse_conv.', 'relation_reuse.'))


def official_dvt_to_ours(checkpoint: dict) -> Tuple[StateDict, dict]:
    """An official DVT checkpoint -> (our DVT state dict, arch dict).

    The stored exit costs (``flops``), the fitted 59 x 3 ``dynamic_threshold`` table and the GFLOPs of its rows
    (``budgeted_batch_classification[0]``) become the model's ``exit_gflops`` / ``threshold_table`` /
    ``threshold_table_gflops`` buffers, so ``DVT(budget=...)`` picks thresholds from them.
    """
    state_dict = checkpoint.get('model_state_dict', checkpoint)
    out = {}
    for key, value in state_dict.items():
        key = key[len('module.'):] if key.startswith('module.') else key
        for prefix, index in _EXITS:
            if key.startswith(prefix):
                rest = key[len(prefix):]
                break
        else:
            raise CheckpointMismatchError(f'unexpected key {key!r}: official DVT keys start with less_less_token. / '
                                          'less_token. / normal_token.')
        if rest.startswith('head.'):
            out[f'heads.{index}.{rest[len("head."):]}'] = value
            continue
        for old, new in _RENAMES:
            rest = rest.replace(old, new)
        rest = re.sub(r'^(tokenizer\.mixer\d)\.w$', r'\1.random_features', rest)
        out[f'exits.{index}.{rest}'] = value
    # The model's buffers: no early exit until thresholds or a budget are chosen.
    out['thresholds'] = torch.full((3, ), 1e8)
    out['exit_gflops'] = torch.as_tensor(checkpoint.get('flops', [0.0, 0.0, 0.0]), dtype=torch.float32).flatten()
    table, budgeted = checkpoint.get('dynamic_threshold'), checkpoint.get('budgeted_batch_classification')
    if table is not None and budgeted is not None:
        out['threshold_table'] = torch.as_tensor(table, dtype=torch.float32)
        out['threshold_table_gflops'] = torch.as_tensor(budgeted[0], dtype=torch.float32)
    else:
        out['threshold_table'], out['threshold_table_gflops'] = torch.zeros(0, 3), torch.zeros(0)
    return out, infer_dvt_arch(out)


def infer_dvt_arch(state_dict: StateDict) -> dict:
    """The DVT arch dict read off our-layout weights (heads from the relation-reuse channels)."""
    try:
        embed_dims = state_dict['exits.0.cls_token'].shape[-1]
        depth = 1 + max(int(k.split('.')[3]) for k in state_dict if k.startswith('exits.0.blocks.'))
        hidden = state_dict['exits.0.blocks.0.mlp.fc1.weight'].shape[0]
        relation_channels = state_dict['exits.1.relation_reuse.2.weight'].shape[0]
    except (KeyError, ValueError) as error:
        raise CheckpointMismatchError(f'cannot read the DVT arch off this checkpoint: missing {error}') from error
    return dict(embed_dims=embed_dims, depth=depth, num_heads=relation_channels // depth,
                mlp_ratio=hidden / embed_dims, qkv_bias='exits.0.blocks.0.attn.qkv.bias' in state_dict,
                tokenizer='t2t' if 'exits.0.tokenizer.project.weight' in state_dict else 'patch')
