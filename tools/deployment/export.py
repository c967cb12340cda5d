#!/usr/bin/env python
"""Export a config's inference network as a torch.export program (.pt2) or an ONNX file, and check it against eager.

    python tools/deployment/export.py configs/dynamicvit/dynamicvit-deit-small_r0.7_8xb128-30e_in1k.py CKPT \
        --format onnx --keep-ratio 0.7 --dynamic-batch
    python tools/deployment/export.py configs/dynamic_swin/mask-rcnn_dynamic-swin-t-r0.7_fpn_1x_coco.py CKPT \
        --format torch-export --shape 800 1344            # a detector's backbone at a padded mmdet test size
    python tools/deployment/export.py configs/dvt/dvt-t2t-vit-12_8xb128-310e_in1k.py CKPT --format onnx  # 3 exits

What is exported: a classifier's logits, the backbone of a detector / segmentor, U-ViT's noise-prediction network,
or each exit of DVT (its early exit is a data-dependent decision between the exits; see sparsevit_mm/deployment.py
and docs/deployment.md). Inputs are normalized images, as after the config's data preprocessor (printed).

The kept-token counts of DynamicViT / DynamicSwin / DynamicConvNeXt are constants of the exported graph: another
keep ratio or input size needs another export. ``--dynamic-batch`` keeps the batch size free.

The exported files are loaded again (torch.export.load / ONNX Runtime) and compared with the eager model on noise
and image-like inputs at the export shape (and at other batch sizes with ``--dynamic-batch``); the tool fails when
the largest absolute difference exceeds ``--atol + --rtol * max |eager output|``.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import tools._quiet  # noqa: E402,F401  (before the frameworks: their deprecation warnings)
from sparsevit_mm.launch import one_line_errors  # noqa: E402

import torch  # noqa: E402
from mmengine.config import DictAction  # noqa: E402

from sparsevit_mm.apis import init_model  # noqa: E402
from sparsevit_mm.deployment import (FORMATS, NotExportable, comparison_cases, eager_outputs,  # noqa
                                     export, export_targets, load_exported, max_difference, run_early_exit,
                                     sparse_model_part)
from sparsevit_mm.models.backbones.base import SparseBackbone  # noqa: E402
from sparsevit_mm.models.classifiers.dvt import DVT, fit_thresholds  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Export a sparse model (torch.export / ONNX) and check it')
    parser.add_argument('config', help='config file of a model of ours')
    parser.add_argument('checkpoint', nargs='?', help='weights (random init if omitted)')
    parser.add_argument('--format', choices=sorted(FORMATS), required=True,
                        help='torch-export: a .pt2 torch.export program; onnx: an ONNX file (checked in ONNX Runtime)')
    parser.add_argument('--shape', type=int, nargs='+', default=None,
                        help='H [W] of the input (default: the size the model is built for, where it has one)')
    parser.add_argument('--keep-ratio', type=float, default=None,
                        help='the keep ratio to export at (default: the config\'s); 1.0 is the dense network')
    parser.add_argument('--dynamic-batch', action='store_true', help='any batch size (DVT exits always have it)')
    parser.add_argument('--batch-size', type=int, default=2, help='batch of the example inputs and the check')
    parser.add_argument('--out-dir', default='work_dirs/deploy', help='where the exported files go')
    parser.add_argument('--atol', type=float, default=1e-4,
                        help='absolute tolerance of the check against eager (fails above atol + rtol * max |eager|)')
    parser.add_argument('--rtol', type=float, default=1e-4, help='relative tolerance of that check')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override config entries, e.g. model.backbone.keep_ratio=0.5')
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.batch_size < 1:
        raise SystemExit(f'--batch-size must be >= 1, got {args.batch_size}')
    model = init_model(args.config, args.checkpoint, 'cpu', args.cfg_options)
    try:
        part = sparse_model_part(model)
    except NotExportable as error:
        raise SystemExit(f'{args.config}: {error}')
    if args.keep_ratio is not None:
        if not isinstance(part, SparseBackbone):
            raise SystemExit(f'--keep-ratio: {type(part).__name__} has no keep ratio (only DynamicViT, '
                             'DynamicSwinTransformer and DynamicConvNeXt do)')
        if not 0.0 < args.keep_ratio <= 1.0:
            raise SystemExit(f'--keep-ratio must be in (0, 1], got {args.keep_ratio}')
        part.keep_ratio = args.keep_ratio
    dynamic = args.dynamic_batch or isinstance(part, DVT)  # later DVT exits see the samples still running
    batch = max(args.batch_size, 2) if dynamic else args.batch_size
    try:
        targets = export_targets(model, args.shape, batch)
    except ValueError as error:
        raise SystemExit(f'{args.config}: {error}')
    height, width = targets[0].inputs[0].shape[-2:]
    describe(model, part, targets, height, width)

    stem = os.path.splitext(os.path.basename(args.config))[0]
    if isinstance(part, SparseBackbone):
        stem += f'_keep{part.keep_ratio:g}'
    stem += f'_{height}x{width}'
    runners, files = [], []
    for target in targets:
        path = os.path.join(args.out_dir, f'{stem}_{target.name}{FORMATS[args.format]}')
        written = export(target, path, args.format, dynamic)
        files += written
        size = sum(os.path.getsize(f) for f in written) / 2 ** 20
        print(f'wrote {" + ".join(written)} ({size:.1f} MiB; inputs {", ".join(target.input_names)}; outputs '
              f'{", ".join(target.output_names)}; batch {"dynamic" if dynamic else batch})')
        runners.append(load_exported(path))
    failures = check(targets, runners, [batch] + ([1, batch + 1] if dynamic else []), args)
    if isinstance(part, DVT):
        failures += check_early_exit(part, targets, runners, batch, args)
        write_exit_table(part, targets, os.path.join(args.out_dir, f'{stem}_exits.json'))
    if failures:
        raise SystemExit(f'{failures} comparison(s) exceed atol {args.atol} + rtol {args.rtol} * max |eager|')
    return files


def describe(model, part, targets, height, width):
    print(f'{type(model).__name__}: exporting {", ".join(t.name for t in targets)} of {type(part).__name__} at '
          f'{height}x{width}')
    preprocessor = getattr(model, 'data_preprocessor', None)
    mean, std = getattr(preprocessor, 'mean', None), getattr(preprocessor, 'std', None)
    if isinstance(mean, torch.Tensor) and isinstance(std, torch.Tensor):
        print(f'inputs are normalized images: (pixel - mean) / std with mean {mean.flatten().tolist()}, std '
              f'{std.flatten().tolist()} (RGB order if the config converts BGR to RGB)')
    if isinstance(part, SparseBackbone):
        with torch.no_grad():
            result = part.forward_sparse(targets[0].inputs[0][:1])
        positions = result.grid[0] * result.grid[1] if result.grid else None
        counts = ', '.join(f'{k.shape[1]}' for k in result.kept_indices) or 'all (dense)'
        print(f'keep ratio {part.keep_ratio:g}: positions kept (or on the slow path) per pruning stage {counts}'
              f'{f" of {positions}" if positions and result.kept_indices else ""} -- fixed in the graph, export '
              'again for another keep ratio or input size')
    if isinstance(part, DVT):
        print('DVT: each exit is its own graph (the early exit decides between them on the data, in Python; see '
              'sparsevit_mm.deployment.run_early_exit); the thresholds go into the _exits.json beside them')


def check(targets, runners, batch_sizes, args) -> int:
    """Compare every exported target with eager on each case; print one row each; return the number failing."""
    failures = 0
    print(f'{"graph":>10} | {"inputs":>16} | {"max |exported - eager|":>22} | {"max |eager|":>11} | ok')
    for case, per_target in comparison_cases(targets, batch_sizes).items():
        for target, run, inputs in zip(targets, runners, per_target):
            reference = eager_outputs(target, inputs)
            difference = max_difference(run(*inputs), reference)
            scale = max(r.abs().max().item() for r in reference if r.numel())
            ok = difference <= args.atol + args.rtol * scale
            failures += not ok
            print(f'{target.name:>10} | {case:>16} | {difference:>22.3g} | {scale:>11.3g} | {"yes" if ok else "NO"}')
    return failures


def check_early_exit(dvt, targets, runners, batch, args) -> int:
    """The exported exits with the early exit run in Python against ``DVT.early_exit`` on the same images, with
    thresholds fitted on them so that a third of the samples leaves at each exit."""
    images = comparison_cases(targets, [max(batch, 6)])[f'image, batch {max(batch, 6)}'][0][0]
    with torch.no_grad():
        confidences = torch.stack([logits.softmax(-1).amax(-1) for logits in dvt.cascade(images)])
    thresholds = fit_thresholds(confidences, [1 / 3] * len(targets))
    saved = dvt.thresholds.clone()
    try:
        dvt.set_thresholds(thresholds)
        reference, reference_exits = dvt.early_exit(images)
    finally:
        dvt.thresholds.copy_(saved)
    logits, exits = run_early_exit(runners, images, thresholds)
    difference = max_difference([logits], [reference])
    same_exits = bool((exits == reference_exits).all())
    ok = same_exits and difference <= args.atol + args.rtol * reference.abs().max().item()
    print(f'early exit over the exported exits (thresholds {[round(t, 4) for t in thresholds[:-1]]}): exits '
          f'{exits.bincount(minlength=len(targets)).tolist()} per exit, same as eager: {same_exits}; max |logits - '
          f'eager| {difference:.3g} | {"yes" if ok else "NO"}')
    return int(not ok)


def write_exit_table(dvt, targets, path):
    """What running the exported exits needs besides the files: their hand-over names and the model's thresholds."""
    table = dict(thresholds=dvt.thresholds.tolist(), exit_gflops=dvt.exit_gflops.tolist(),
                 exits=[dict(name=t.name, inputs=list(t.input_names), outputs=list(t.output_names)) for t in targets])
    with open(path, 'w') as f:
        json.dump(table, f, indent=2)
    print(f'wrote {path} (thresholds {table["thresholds"]}: set them with --cfg-options model.thresholds=... or a '
          'checkpoint fitted by tools/analysis/dvt_thresholds.py)')


if __name__ == '__main__':
    with one_line_errors():  # a bad value or file: its message, no traceback
        main()
