#!/usr/bin/env python
"""Convert an official checkpoint to the sparsevit-mm layout, for every model family here.

    python tools/model_converters/official_to_sparsevit.py SRC DST [--num-heads N] [--arch NAME_OR_JSON]

SRC: official DynamicViT / LV-ViT / DeiT (official or timm), DynamicSwin / Swin, DynamicCNN / ConvNeXt, DVT or
U-ViT (``nnet.pth`` / ``nnet_ema.pth``) weights (``{'model': state_dict}``, DVT's ``{'model_state_dict': ...}`` or
a raw state dict). The family and arch are read off the keys and shapes; DVT's stored exit costs and threshold
table are kept. What a checkpoint cannot record is asked for: ViT and U-ViT checkpoints store no head count, so
for a width outside the official arch tables give ``--num-heads`` (without it, 64 channels per head are assumed,
said on stderr and recorded in ``meta['inferred']``); ``--arch`` replaces the inferred arch (a zoo name or a JSON
dict, e.g. ``'{"embed_dims": 64, "num_layers": 4, "num_heads": 2}'``).

DST: an mmengine checkpoint (``{'state_dict': ..., 'meta': ...}``) of the whole model (a classifier's
``backbone.*`` + ``head.*``, DVT, or UViTDiffusion), for ``tools/test.py`` or ``init_cfg=dict(type='Pretrained',
checkpoint=DST, prefix='backbone.')``; ``meta['model']`` is the model config it fits. The weights are checked
against that model: a checkpoint that does not fit names its missing, unexpected and mis-shaped keys. Dense
checkpoints convert the same way (their predictors / fast paths are simply absent).
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import tools._quiet  # noqa: E402,F401  (before the frameworks: their deprecation warnings)
from sparsevit_mm.launch import one_line_errors  # noqa: E402

import torch  # noqa: E402

from sparsevit_mm.apis import convert_official  # noqa: E402
from sparsevit_mm.utils import CheckpointMismatchError  # noqa: E402


def describe(model_cfg: dict, state_dict: dict) -> str:
    if model_cfg['type'] == 'DVT':
        costs = 'kept' if float(state_dict['exit_gflops'].sum()) > 0 else 'absent'
        table = 'kept' if len(state_dict['threshold_table']) else 'absent'
        return (f'DVT arch {model_cfg["arch"]}, {model_cfg["num_classes"]} classes, exit costs {costs}, '
                f'threshold table {table}')
    if model_cfg['type'] == 'UViTDiffusion':
        return f'UViTDiffusion with network {model_cfg["network"]}'
    backbone, head = model_cfg['backbone'], model_cfg['head']
    dynamic = any('score_predictors' in k for k in state_dict)
    return (f'{backbone["type"]} arch {backbone["arch"]}, {head["type"]} ({head["num_classes"]} classes), '
            f'score predictors {"included" if dynamic else "absent (dense)"}')


def main(argv=None):
    parser = argparse.ArgumentParser(description='Convert an official checkpoint to the sparsevit-mm layout')
    parser.add_argument('src', help='official checkpoint')
    parser.add_argument('dst', help='output path')
    parser.add_argument('--num-heads', type=int, help='attention heads (ViT / U-ViT checkpoints do not record them)')
    parser.add_argument('--arch', help='arch to use instead of the inferred one: a zoo name or a JSON dict')
    args = parser.parse_args(argv)
    try:
        state_dict, model_cfg, notes = convert_official(args.src, num_heads=args.num_heads, arch=args.arch)
    except (CheckpointMismatchError, FileNotFoundError, ValueError) as error:
        sys.exit(f'error: {error}')  # the message names the file and the keys; a traceback would add nothing
    for note in notes:
        print(f'warning: {args.src}: {note}', file=sys.stderr)
    meta = dict(source=os.path.abspath(args.src), model=model_cfg, inferred=notes)
    if model_cfg['type'] == 'ImageClassifier':
        meta.update(backbone=model_cfg['backbone'], head=model_cfg['head'],
                    score_predictors=any('score_predictors' in k for k in state_dict))
    os.makedirs(os.path.dirname(os.path.abspath(args.dst)), exist_ok=True)
    torch.save({'state_dict': state_dict, 'meta': meta}, args.dst)
    print(f'{args.src} -> {args.dst}: {describe(model_cfg, state_dict)}')


if __name__ == '__main__':
    with one_line_errors():  # a bad value or file: its message, no traceback
        main()
