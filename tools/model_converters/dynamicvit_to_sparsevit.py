#!/usr/bin/env python
"""Convert an official DynamicViT / LV-ViT / DeiT (official or timm) checkpoint to the sparsevit-mm layout.

    python tools/model_converters/dynamicvit_to_sparsevit.py dynamicvit_r0.7.pth dynamicvit-deit-small_r0.7.pth

The output is an mmengine checkpoint (``{'state_dict': ..., 'meta': ...}``) of the whole classifier
(``backbone.*`` = DynamicViT, ``head.*`` = VisionTransformerClsHead, or TokenLabelingClsHead for LV-ViT). Use it
with ``tools/test.py`` or as ``init_cfg=dict(type='Pretrained', checkpoint=..., prefix='backbone.')``. A dense
DeiT / LV-ViT checkpoint converts the same way (its score predictors are simply absent). The conversion is checked
by loading the result into the architecture read off the checkpoint; a checkpoint that does not fit names its
missing and unexpected keys.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402

from sparsevit_mm.converters.dynamicvit import detect_layout, infer_backbone_kwargs, official_to_classifier  # noqa: E402,E501
from sparsevit_mm.models import DynamicViT  # noqa: E402
from sparsevit_mm.utils.checkpoint import load_state_dict_file  # noqa: E402


def convert(src: str, dst: str, num_heads: int = None) -> dict:
    state_dict = load_state_dict_file(src)
    layout = detect_layout(state_dict)
    if layout != 'official':
        raise SystemExit(f'{src} is not in the official DynamicViT / DeiT / LV-ViT layout (looks like {layout!r})')
    converted = official_to_classifier(state_dict)
    kwargs = infer_backbone_kwargs(state_dict)
    if num_heads is not None:
        if isinstance(kwargs['arch'], str):
            kwargs['arch'] = dict(DynamicViT.arch_zoo[kwargs['arch']])
        kwargs['arch']['num_heads'] = num_heads
    backbone = DynamicViT(**kwargs, keep_ratio=1.0)
    backbone.load_checked({k[len('backbone.'):]: v for k, v in converted.items() if k.startswith('backbone.')},
                          source=src)
    head = 'TokenLabelingClsHead' if 'head.token_fc.weight' in converted else 'VisionTransformerClsHead'
    num_classes = converted['head.cls_fc.weight' if head == 'TokenLabelingClsHead' else 'head.layers.head.weight'].shape[0]
    has_predictors = any(k.startswith('backbone.score_predictors.') for k in converted)
    meta = dict(source=os.path.abspath(src), **kwargs, head=head, num_classes=num_classes,
                score_predictors=has_predictors)
    os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
    torch.save({'state_dict': converted, 'meta': meta}, dst)
    return meta


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[1])
    parser.add_argument('src', help='official checkpoint ({"model": state_dict} or a raw state dict)')
    parser.add_argument('dst', help='output path')
    parser.add_argument('--num-heads', type=int, default=None,
                        help='attention heads of a custom arch (not stored in checkpoints; default dims // 64)')
    args = parser.parse_args(argv)
    meta = convert(args.src, args.dst, args.num_heads)
    print(f"{args.src} -> {args.dst}: arch {meta['arch']}, head {meta['head']} ({meta['num_classes']} classes), "
          f"score predictors {'included' if meta['score_predictors'] else 'absent (dense checkpoint)'}")


if __name__ == '__main__':
    main()
