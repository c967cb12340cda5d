#!/usr/bin/env python
"""Convert an official checkpoint to the sparsevit-mm layout, for every model family here.

    python tools/model_converters/official_to_sparsevit.py SRC DST

SRC: official DynamicViT / LV-ViT / DeiT (official or timm), DynamicSwin / Swin, DynamicCNN / ConvNeXt, DVT or
U-ViT (``nnet.pth`` / ``nnet_ema.pth``) weights (``{'model': state_dict}``, DVT's ``{'model_state_dict': ...}`` or a raw state dict; the family and arch are
read off the keys and shapes; DVT's stored exit costs and threshold table are kept).
DST: an mmengine checkpoint (``{'state_dict': ..., 'meta': ...}``) of the whole classifier, ``backbone.*`` +
``head.*``, for ``tools/test.py`` or ``init_cfg=dict(type='Pretrained', checkpoint=DST, prefix='backbone.')``;
``meta`` records the backbone and head configs it fits. A checkpoint that does not fit names its missing and
unexpected keys. Dense checkpoints convert the same way (their predictors / fast paths are simply absent).
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402

from sparsevit_mm.converters import convert_official  # noqa: E402
from sparsevit_mm.utils.checkpoint import load_checkpoint_file, unwrap_state_dict  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description='Convert an official checkpoint to the sparsevit-mm layout')
    parser.add_argument('src', help='official checkpoint')
    parser.add_argument('dst', help='output path')
    args = parser.parse_args(argv)
    checkpoint = load_checkpoint_file(args.src)
    converted, model, head = convert_official(unwrap_state_dict(checkpoint), checkpoint)
    os.makedirs(os.path.dirname(os.path.abspath(args.dst)), exist_ok=True)
    if head is None:  # a whole model (DVT, U-ViT)
        torch.save({'state_dict': converted, 'meta': dict(source=os.path.abspath(args.src), model=model)}, args.dst)
        if model['type'] == 'DVT':
            print(f'{args.src} -> {args.dst}: DVT arch {model["arch"]}, {model["num_classes"]} classes, exit costs '
                  f'{"kept" if float(converted["exit_gflops"].sum()) > 0 else "absent"}, threshold table '
                  f'{"kept" if len(converted["threshold_table"]) else "absent"}')
        else:
            print(f'{args.src} -> {args.dst}: UViTDiffusion with network {model["network"]}')
        return
    dynamic = any('score_predictors' in k for k in converted)
    meta = dict(source=os.path.abspath(args.src), backbone=model, head=head, score_predictors=dynamic)
    torch.save({'state_dict': converted, 'meta': meta}, args.dst)
    print(f'{args.src} -> {args.dst}: {model["type"]} arch {model["arch"]}, {head["type"]} '
          f'({head["num_classes"]} classes), score predictors {"included" if dynamic else "absent (dense)"}')


if __name__ == '__main__':
    main()
