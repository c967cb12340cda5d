#!/usr/bin/env python
"""Evaluate a checkpoint on the test split of any mmpretrain / mmdet / mmseg config.

    python tools/test.py CONFIG CHECKPOINT [--work-dir DIR] [--out results.pkl] [--cfg-options k=v ...]
    bash tools/dist_test.sh CONFIG CHECKPOINT NUM_GPUS [args]

``--cfg-options model.backbone.keep_ratio=0.5`` evaluates the same weights at another token budget.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import tools._quiet  # noqa: E402,F401  (before the frameworks: their deprecation warnings)

from mmengine.config import DictAction  # noqa: E402
from torch.distributed.elastic.multiprocessing.errors import record  # noqa: E402

import sparsevit_mm  # noqa: E402,F401  (registers our models)
from sparsevit_mm.launch import (add_checkpoint_layout_hook, build_runner, common_dataloader_defaults,  # noqa: E402
                                 distributed_run, one_line_errors, setup_launcher)
from sparsevit_mm.utils.config import load_config  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Test (evaluate) a checkpoint')
    parser.add_argument('config', help='config file')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument('--work-dir', help='where the evaluation log goes')
    parser.add_argument('--out', help='also dump the raw predictions to this pickle file')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction, help='override config entries')
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'], default='none',
                        help='job launcher (dist_test.sh / slurm scripts set it)')
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0,
                        help='set by older launchers (torchrun uses LOCAL_RANK)')
    return parser.parse_args(argv)


@record  # under torchrun, the failing rank's traceback is the run's root cause
def main(argv=None):
    args = parse_args(argv)
    if '://' not in args.checkpoint and not os.path.isfile(args.checkpoint):  # a URL is fetched when loaded
        raise FileNotFoundError(f'checkpoint {args.checkpoint} does not exist')
    cfg = load_config(args.config, args.cfg_options, args.work_dir, args.launcher)
    cfg.load_from = args.checkpoint
    add_checkpoint_layout_hook(cfg)  # official / other layouts are converted; a misfit is an error, not a warning
    if cfg.get('test_dataloader') is None or cfg.get('test_evaluator') is None:
        raise ValueError(f'{args.config} has no test_dataloader / test_evaluator to evaluate with')
    if args.out:
        evaluators = cfg.test_evaluator if isinstance(cfg.test_evaluator, list) else [cfg.test_evaluator]
        cfg.test_evaluator = list(evaluators) + [dict(type='DumpResults', out_file_path=args.out)]
    common_dataloader_defaults(cfg, ('test_dataloader',))
    setup_launcher(cfg, args.launcher)
    with distributed_run():  # a clean teardown on success; a failing rank exits at once
        metrics = build_runner(cfg).test()
    return metrics


if __name__ == '__main__':
    with one_line_errors():  # a bad value or file: its message, no traceback
        main()
