"""What our ``tools/`` scripts share: the hooks they add to a config, mixed precision, resume, and launching
(including CPU-only DDP). Config reading itself is :mod:`sparsevit_mm.utils.config`."""
import contextlib
import gc
import os
from typing import Optional, Sequence

import torch
from mmengine.config import Config
from mmengine.runner.checkpoint import find_latest_checkpoint

from .models.backbones.base import SparseBackbone
from .registry import get_class
from .utils.checkpoint import allow_mmengine_checkpoints


def enable_amp(cfg: Config):
    """Mixed precision through mmengine's AmpOptimWrapper (dynamic loss scale)."""
    optim_wrapper = cfg.get('optim_wrapper')
    if optim_wrapper is None:
        raise ValueError('--amp needs an optim_wrapper in the config')
    if optim_wrapper.get('type', 'OptimWrapper') == 'AmpOptimWrapper':
        return
    if not torch.cuda.is_available():
        raise ValueError('--amp needs a CUDA device (mmengine\'s AmpOptimWrapper runs on GPU / NPU / MLU only); '
                         'drop --amp to train in float32 on this machine')
    optim_wrapper.type = 'AmpOptimWrapper'
    optim_wrapper.setdefault('loss_scale', 'dynamic')


def setup_launcher(cfg: Config, launcher: str):
    """Prepare distributed training; on a machine without CUDA, DDP runs on CPU over gloo.

    mmengine assumes one CUDA device per process (it calls ``torch.cuda.set_device`` and passes ``device_ids``);
    without CUDA we initialise the gloo process group ourselves and wrap the model with ``device_ids=None``.
    """
    allow_mmengine_checkpoints()  # mmengine's resume reads its own types through torch's safe loader
    if launcher == 'none':
        return
    if launcher == 'pytorch' and 'LOCAL_RANK' not in os.environ:
        raise RuntimeError('--launcher pytorch expects to be started by torchrun (LOCAL_RANK is not set); '
                           'use tools/dist_train.sh / tools/dist_test.sh')
    if torch.cuda.is_available():
        return
    if launcher != 'pytorch':
        raise RuntimeError(f'--launcher {launcher} needs CUDA; on a CPU-only machine use --launcher pytorch '
                           '(tools/dist_train.sh), which runs over gloo')
    env_cfg = cfg.setdefault('env_cfg', {})
    dist_cfg = env_cfg.setdefault('dist_cfg', {})
    dist_cfg['backend'] = 'gloo'
    import torch.distributed as dist
    if not dist.is_initialized():
        dist.init_process_group(backend='gloo')
    wrapper = cfg.get('model_wrapper_cfg') or dict(type='MMDistributedDataParallel')
    wrapper['device_ids'] = None
    wrapper.setdefault('broadcast_buffers', False)
    wrapper.setdefault('find_unused_parameters', cfg.get('find_unused_parameters', False))
    cfg.model_wrapper_cfg = wrapper


def build_runner(cfg: Config):
    from mmengine.registry import RUNNERS
    from mmengine.runner import Runner
    return RUNNERS.build(cfg) if 'runner_type' in cfg else Runner.from_cfg(cfg)


def parse_resume(cfg: Config, resume: Optional[str]):
    """``--resume`` alone resumes from the latest checkpoint of the work dir, which must exist; ``--resume auto``
    resumes if there is one and starts afresh otherwise; ``--resume PATH`` resumes from PATH."""
    if resume is None:
        return
    if resume == 'latest' and find_latest_checkpoint(cfg.work_dir) is None:
        raise ValueError(f'--resume: nothing to resume in the work dir {cfg.work_dir} (no checkpoint there); give '
                         'the checkpoint (--resume PATH) or the right --work-dir, or --resume auto to resume only '
                         'if a checkpoint is there')
    if resume not in ('latest', 'auto') and '://' not in resume and not os.path.isfile(resume):
        raise FileNotFoundError(f'--resume {resume}: no such checkpoint file')
    cfg.resume = True
    cfg.load_from = None if resume in ('latest', 'auto') else resume


def common_dataloader_defaults(cfg: Config, fields: Sequence[str] = ('train_dataloader', 'val_dataloader',
                                                                       'test_dataloader')):
    """Persistent workers only make sense with workers (mmengine refuses the combination otherwise)."""
    for field in fields:
        loader = cfg.get(field)
        if loader is not None and loader.get('num_workers', 0) == 0:
            loader['persistent_workers'] = False


def add_keep_ratio_loss_hook(cfg: Config) -> bool:
    """Add ``KeepRatioLossHook`` when the model's backbone is one of ours and nothing else computes that loss.

    This is what makes an upstream mmdet / mmseg / mmpretrain config work with only the backbone swapped (our
    ``DynamicViTClassifier`` computes the loss itself). Returns whether the hook was added.
    """
    model = cfg.get('model') or {}
    backbone = model.get('backbone') or {}
    backbone_class = get_class(str(backbone.get('type', '')).split('.')[-1])
    if backbone_class is None or not issubclass(backbone_class, SparseBackbone):
        return False
    if str(model.get('type', '')).split('.')[-1] == 'DynamicViTClassifier':
        return False
    return add_custom_hook(cfg, 'KeepRatioLossHook')


def add_custom_hook(cfg: Config, hook_type: str) -> bool:
    """Append ``dict(type=hook_type)`` to ``cfg.custom_hooks`` unless such a hook is there; returns whether it was."""
    hooks = list(cfg.get('custom_hooks') or [])
    if any(str(h.get('type', '')).split('.')[-1] == hook_type for h in hooks):
        return False
    cfg.custom_hooks = hooks + [dict(type=hook_type)]
    return True


def add_checkpoint_layout_hook(cfg: Config) -> bool:
    """Add ``CheckpointLayoutHook``: ``load_from`` / resume convert any supported layout and refuse misfits."""
    return add_custom_hook(cfg, 'CheckpointLayoutHook')


def add_random_state_hook(cfg: Config) -> bool:
    """Add ``RandomStateHook`` (RNG states in checkpoints: a resumed run is bit-identical) unless it is there."""
    return add_custom_hook(cfg, 'RandomStateHook')


@contextlib.contextmanager
def distributed_run():
    """Around a runner's ``train()`` / ``test()``: on success, leave the process group cleanly
    (:func:`teardown_distributed`); on an error, leave at once. A rank that failed alone must not wait in a barrier
    for ranks still in a collective (gloo's default timeout is 30 minutes, and the error would not show until then);
    once it exits, torchrun stops the others."""
    yield
    teardown_distributed()


def teardown_distributed():
    """Leave the process group cleanly, and while the interpreter is still alive.

    A gloo group lives on while anything references it (the DDP wrapper inside a runner, which only the garbage
    collector frees), and its worker threads let go of a finished work after the caller has moved on. A work holding
    tensors with Python objects needs the GIL for that; during interpreter finalization the thread cannot take it and
    the process aborts ("terminate called without an active exception", about one run in 40 on a loaded machine).
    So: barrier, destroy, then collect garbage now, which frees the group and joins its threads (torch's holder
    releases the GIL in that destructor).
    """
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
        gc.collect()


@contextlib.contextmanager
def one_line_errors():
    """Around a tool's ``main()``: what a bad value or file raises (``ValueError``, ``TypeError``,
    ``FileNotFoundError``, :class:`~sparsevit_mm.utils.CheckpointMismatchError`) ends the tool with its message on one
    line and exit status 1, without a traceback; ``SPARSEVIT_TRACEBACK=1`` shows the traceback instead."""
    try:
        yield
    except (ValueError, TypeError, FileNotFoundError) as error:
        if os.environ.get('SPARSEVIT_TRACEBACK', '') not in ('', '0'):
            raise
        raise SystemExit(f'error: {error}  (SPARSEVIT_TRACEBACK=1 shows where)') from None
