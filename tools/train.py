#!/usr/bin/env python
"""Train any mmpretrain / mmdet / mmseg config (ours or upstream with a sparsevit-mm backbone).

    python tools/train.py CONFIG [--work-dir DIR] [--resume [CKPT]] [--amp] [--cfg-options k=v ...]
    bash tools/dist_train.sh CONFIG NUM_GPUS [args]        # torchrun, --launcher pytorch
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import tools._quiet  # noqa: E402,F401  (before the frameworks: their deprecation warnings)

from mmengine.config import DictAction  # noqa: E402
from torch.distributed.elastic.multiprocessing.errors import record  # noqa: E402

import sparsevit_mm  # noqa: E402,F401  (registers our models)
from sparsevit_mm.launch import (add_checkpoint_layout_hook, add_keep_ratio_loss_hook,  # noqa: E402
                                 add_random_state_hook, build_runner, common_dataloader_defaults, distributed_run,
                                 enable_amp, one_line_errors, parse_resume, setup_launcher)
from sparsevit_mm.utils.config import load_config  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Train a model with mmengine\'s runner')
    parser.add_argument('config', help='config file (mmpretrain, mmdet, mmseg or configs/ of this repo)')
    parser.add_argument('--work-dir', help='where logs and checkpoints go (default ./work_dirs/<config name>)')
    parser.add_argument('--resume', nargs='?', const='latest', default=None, metavar='CKPT',
                        help='resume from CKPT; without CKPT from the latest checkpoint in the work dir (an error if '
                             'there is none); "--resume auto": from it if there is one, else start afresh')
    parser.add_argument('--amp', action='store_true', help='automatic mixed precision')
    parser.add_argument('--no-validate', action='store_true', help='skip validation during training')
    parser.add_argument('--auto-scale-lr', action='store_true',
                        help='scale the lr by the actual batch size / auto_scale_lr.base_batch_size')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override config entries, e.g. model.backbone.keep_ratio=0.5')
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'], default='none',
                        help='job launcher (dist_train.sh / slurm scripts set it)')
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0,
                        help='set by older launchers (torchrun uses LOCAL_RANK)')
    return parser.parse_args(argv)


@record  # under torchrun, the failing rank's traceback is the run's root cause
def main(argv=None):
    args = parse_args(argv)
    cfg = load_config(args.config, args.cfg_options, args.work_dir, args.launcher)
    if args.no_validate:
        cfg.val_cfg = cfg.val_dataloader = cfg.val_evaluator = None
    if args.amp:
        enable_amp(cfg)
    if args.auto_scale_lr:
        if 'auto_scale_lr' not in cfg:
            raise ValueError('--auto-scale-lr needs auto_scale_lr.base_batch_size in the config')
        cfg.auto_scale_lr.enable = True
    add_keep_ratio_loss_hook(cfg)  # the backbone's keep-ratio loss reaches the detector / segmentor loss dict
    add_random_state_hook(cfg)  # RNG states in checkpoints: resuming is bit-identical to not stopping
    add_checkpoint_layout_hook(cfg)  # load_from / resume: any supported layout, misfits refused
    parse_resume(cfg, args.resume)
    common_dataloader_defaults(cfg)
    setup_launcher(cfg, args.launcher)
    with distributed_run():  # a clean teardown on success; a failing rank exits at once
        build_runner(cfg).train()


if __name__ == '__main__':
    with one_line_errors():  # a bad value or file: its message, no traceback
        main()
