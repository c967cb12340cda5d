#!/usr/bin/env python
"""Fit DVT's exit thresholds for FLOPs budgets and print the budget -> (GFLOPs, top-1) table.

    python tools/analysis/dvt_thresholds.py CONFIG CHECKPOINT [--fit-samples 50000] [--budgets 1.0 2.0]
        [--out dvt_fitted.pth]

As the official evaluation: exit fractions proportional to q, q^2, q^3 for q = 0.05, 0.10, ..., 2.95 (59 settings);
thresholds are fitted on held-out *training* images seen through the training pipeline (no labels used), then the
validation split gives each setting's accuracy and expected GFLOPs (fraction leaving at exit k x cumulative cost of
exits 1..k). Also prints each exit's own top-1 (anytime classification). ``--out`` saves the model with the fitted
table, so ``model.budget=G`` (config or ``--cfg-options``) picks thresholds for a budget in tools/test.py.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import tools._quiet  # noqa: E402,F401  (before the frameworks: their deprecation warnings)

import torch  # noqa: E402
from mmengine.config import DictAction  # noqa: E402
from tqdm import tqdm  # noqa: E402

from sparsevit_mm.apis import init_model  # noqa: E402
from sparsevit_mm.models.classifiers.dvt import exit_fraction_targets, fit_thresholds  # noqa: E402
from sparsevit_mm.launch import one_line_errors  # noqa: E402

Q_VALUES = [p / 20 for p in range(1, 60)]


@torch.no_grad()
def collect(model, loader, desc):
    """Per-exit softmax confidences (K, N) and predictions (K, N), and the labels (N)."""
    confidences, predictions, labels = [], [], []
    for data in tqdm(loader, desc=desc, leave=False):
        data = model.data_preprocessor(data, False)
        probs = torch.stack([logits.softmax(-1) for logits in model.cascade(data['inputs'])])  # (K, B, C)
        confidences.append(probs.amax(-1))
        predictions.append(probs.argmax(-1))
        labels.append(torch.cat([s.gt_label for s in data['data_samples']]))
    return torch.cat(confidences, 1), torch.cat(predictions, 1), torch.cat(labels)


def evaluate(thresholds, confidences, predictions, labels, costs):
    """Top-1 (%) and expected GFLOPs of early exit with ``thresholds`` on stored per-exit outputs."""
    passes = confidences >= torch.tensor(thresholds)[:, None]
    passes[-1] = True
    exit_of = passes.float().argmax(0)
    chosen = predictions.gather(0, exit_of[None])[0]
    fractions = [(exit_of == k).float().mean().item() for k in range(len(costs))]
    return 100.0 * (chosen == labels).float().mean().item(), sum(f * c for f, c in zip(fractions, costs)), fractions


def build_loader(cfg, which, samples):
    from mmengine.runner import Runner
    loader = cfg[which].copy()
    dataset = loader['dataset'].copy()
    if samples:
        dataset['indices'] = samples
    loader.update(dataset=dataset, sampler=dict(type='DefaultSampler', shuffle=False), persistent_workers=False)
    loader.pop('batch_sampler', None)
    return Runner.build_dataloader(loader)


def main(argv=None):
    parser = argparse.ArgumentParser(description='Fit DVT exit thresholds for FLOPs budgets')
    parser.add_argument('config', help='a DVT config')
    parser.add_argument('checkpoint', help='the trained DVT checkpoint')
    parser.add_argument('--fit-samples', type=int, default=50000, help='held-out training images to fit on')
    parser.add_argument('--val-samples', type=int, default=0, help='validation images (0 = all)')
    parser.add_argument('--budgets', type=float, nargs='*', default=[], help='GFLOPs budgets to report')
    parser.add_argument('--out', help='save the model with the fitted threshold table here')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override config entries, e.g. model.backbone.keep_ratio=0.5')
    args = parser.parse_args(argv)

    model = init_model(args.config, args.checkpoint, cfg_options=args.cfg_options)
    if not hasattr(model, 'cascade'):
        raise ValueError(f'{type(model).__name__} is not an early-exit model (DVT)')
    cfg = model.cfg
    costs = model.exit_gflops.tolist() if float(model.exit_gflops.sum()) > 0 else model.measure_exit_gflops()
    fit = collect(model, build_loader(cfg, 'train_dataloader', args.fit_samples), 'fit (train split)')
    val = collect(model, build_loader(cfg, 'test_dataloader', args.val_samples), 'evaluate (test split)')

    print('anytime classification (each exit on every image):')
    for k, cost in enumerate(costs):
        print(f'  exit {k + 1}: {cost:.3f} GFLOPs (cumulative), top-1 {100 * (val[1][k] == val[2]).float().mean():.2f}')
    rows = []
    print(f'{"q":>5} | {"exit fractions (fit)":>20} | {"GFLOPs":>7} | {"top-1":>6} | thresholds')
    for q in Q_VALUES:
        thresholds = fit_thresholds(fit[0], exit_fraction_targets(q, len(costs)))
        top1, gflops, fractions = evaluate(thresholds, *val, costs)
        rows.append((q, thresholds, gflops, top1))
        print(f'{q:>5.2f} | {" / ".join(f"{f:.2f}" for f in fractions):>20} | {gflops:>7.3f} | {top1:>6.2f} | '
              f'{", ".join(f"{t:.4f}" for t in thresholds[:-1])}')
    for budget in args.budgets:
        within = [r for r in rows if r[2] <= budget]
        if not within:
            print(f'budget {budget:.3f} GFLOPs: below every setting (exit 1 alone costs {costs[0]:.3f})')
            continue
        q, thresholds, gflops, top1 = max(within, key=lambda r: r[2])
        print(f'budget {budget:.3f} GFLOPs -> q {q:.2f}: {gflops:.3f} GFLOPs, top-1 {top1:.2f}')
    if args.out:
        model.threshold_table = torch.tensor([r[1] for r in rows])
        model.threshold_table_gflops = torch.tensor([r[2] for r in rows])
        model.exit_gflops.copy_(torch.tensor(costs))
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        torch.save({'state_dict': model.state_dict(), 'meta': dict(source=args.checkpoint, q_values=Q_VALUES,
                                                                   top1=[r[3] for r in rows])}, args.out)
        print(f'wrote {args.out} (use model.budget=<GFLOPs> to pick thresholds)')
    return rows


if __name__ == '__main__':
    with one_line_errors():  # a bad value or file: its message, no traceback
        main()
