"""Checkpointing the random number generators: a resumed training run is bit-identical to an uninterrupted one."""
import logging
import random
from typing import List, Optional

import numpy as np
import torch
from mmengine.dist import all_gather_object, get_rank, get_world_size
from mmengine.hooks import CheckpointHook, Hook
from mmengine.logging import print_log


def capture_random_states() -> dict:
    """This process's RNG states (torch CPU, CUDA if in use, numpy's global and python's ``random``).

    Only tensors, ints, floats, strings, lists and dicts: what ``torch.load(weights_only=True)`` reads without any
    allow-listing.
    """
    states = dict(torch=torch.get_rng_state())
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states['cuda'] = list(torch.cuda.get_rng_state_all())
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    states['numpy'] = dict(kind=str(kind), keys=torch.from_numpy(np.asarray(keys, dtype=np.int64)), pos=int(pos),
                           has_gauss=int(has_gauss), cached_gaussian=float(cached_gaussian))
    version, internal, gauss_next = random.getstate()
    states['python'] = dict(version=int(version), internal=torch.tensor(internal, dtype=torch.int64),
                            has_gauss_next=int(gauss_next is not None),
                            gauss_next=float(gauss_next) if gauss_next is not None else 0.0)
    return states


def restore_random_states(states: dict) -> None:
    """Inverse of :func:`capture_random_states` (tensors may come back on another device: they move to the CPU)."""
    torch.set_rng_state(states['torch'].detach().cpu().to(torch.uint8))
    if 'cuda' in states and torch.cuda.is_available():
        cuda = [s.detach().cpu().to(torch.uint8) for s in states['cuda']]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:
            print_log(f'RandomStateHook: the checkpoint holds {len(cuda)} CUDA RNG states but this process sees '
                      f'{torch.cuda.device_count()} devices; the CUDA generators are not restored',
                      logger='current', level=logging.WARNING)
    np_state = states['numpy']
    np.random.set_state((np_state['kind'], np_state['keys'].cpu().numpy().astype(np.uint32), int(np_state['pos']),
                         int(np_state['has_gauss']), float(np_state['cached_gaussian'])))
    py_state = states['python']
    gauss_next = float(py_state['gauss_next']) if py_state['has_gauss_next'] else None
    random.setstate((int(py_state['version']), tuple(int(x) for x in py_state['internal'].tolist()), gauss_next))


class _RestoreBeforeFetch:
    """Stands in for ``IterBasedTrainLoop.dataloader_iterator`` while a resumed loop skips the batches it has
    already trained on: lets ``skip`` ``next()`` calls through, then restores the RNG states, puts the real iterator
    back and fetches the first new batch."""

    def __init__(self, loop, iterator, skip: int, restore):
        self._loop = loop
        self._iterator = iterator
        self._skip = skip
        self._restore = restore

    def __iter__(self):
        return self

    def __next__(self):
        if self._skip > 0:
            self._skip -= 1
            return next(self._iterator)
        self._loop.dataloader_iterator = self._iterator
        self._restore()
        return next(self._iterator)

    def __getattr__(self, name):
        return getattr(self.__dict__['_iterator'], name)


class RandomStateHook(Hook):
    """Save the RNG states with every checkpoint and restore them on resume: resumed training is bit-identical.

    mmengine's resume restores weights, optimizer, schedulers and counters, and re-seeds the generators with the
    config's seed, but not their *states*: after a resume the Gumbel noise of the token-pruning decisions, dropout /
    drop path, Mixup / CutMix and the data augmentations draw different numbers than an uninterrupted run would.

    What is saved: ``checkpoint['random_states']``, a list indexed by rank of dicts with the torch CPU state, the
    CUDA states (when CUDA is in use), numpy's global and python's ``random`` states, all as tensors / ints / floats /
    strings (``torch.load(weights_only=True)`` reads them as they are). ``Runner.save_checkpoint`` is master-only,
    so under DDP ``before_save_checkpoint`` runs on rank 0 alone: every rank's states are gathered beforehand, on
    all ranks, in ``after_train_epoch`` and in ``after_train_iter`` of iterations at which a ``CheckpointHook``
    saves (and in ``before_val``, for checkpoints saved during validation such as the best one).

    When they are restored: right before the first RNG consumer of the uninterrupted run after the checkpoint, the
    next training batch fetch (creating a DataLoader iterator draws a seed from torch's generator even without
    workers; without workers the augmentations run in this process too). With an ``EpochBasedTrainLoop`` that is
    the first ``before_train_epoch`` after the resume (this hook runs first: priority ``VERY_HIGH``); an
    ``IterBasedTrainLoop`` first re-reads the batches it has already trained on (running their augmentations), so
    its dataloader iterator is wrapped and the states are restored just before the first new batch. If the
    checkpoint holds no states (older checkpoint) or another number of ranks than this run, training continues
    with a warning, not bit-identical.

    Validation is made RNG-neutral: the states are saved in ``before_val`` and restored in ``after_val`` (its
    DataLoader iterator, too, draws from the generators). Besides making resume exact, this means training results
    no longer depend on how often (or whether) one validates.

    Not exact even so: checkpoints saved in the middle of an epoch of an ``EpochBasedTrainLoop`` (mmengine restarts
    that epoch from its first batch: a warning says so), ``persistent_workers=True`` dataloaders with workers (the
    workers' generators live in the worker processes and start again from the seed: a warning says so; without
    persistent workers each epoch's workers are seeded afresh, which resumes exactly), checkpoints saved
    in the middle of a gradient-accumulation cycle (the accumulated gradients are not saved; mmengine warns), and
    generators other than the global ones (``torch.Generator`` objects a module owns).
    """
    priority = 'VERY_HIGH'

    def __init__(self):
        self._resume_states: Optional[dict] = None  # this rank's states from the checkpoint, until restored
        self._val_states: Optional[dict] = None  # this rank's states when validation began
        self._val_gathered: Optional[List[dict]] = None  # every rank's, for checkpoints saved during validation
        self._gathered: Optional[dict] = None  # dict(stamp=(epoch, iter), states=[every rank's states])

    # ----------------------------------------------------------------------------------------------- saving
    @staticmethod
    def _stamp(runner):
        return runner.epoch, runner.iter

    def _gather(self, runner):
        """Collective under DDP: every rank's current states, kept for the next checkpoint of this step."""
        self._gathered = dict(stamp=self._stamp(runner), states=all_gather_object(capture_random_states()))

    @staticmethod
    def _checkpoint_due(runner) -> bool:
        """Whether a ``CheckpointHook`` saves at the end of this iteration (the same test it makes)."""
        for hook in getattr(runner, 'hooks', []):
            if not isinstance(hook, CheckpointHook) or hook.by_epoch:
                continue
            try:
                if hook.every_n_train_iters(runner, hook.interval, hook.save_begin) or (
                        hook.save_last and hook.is_last_train_iter(runner)):
                    return True
            except Exception:  # an unusual subclass: gather rather than miss the checkpoint
                return True
        return False

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        if get_world_size() > 1 and self._checkpoint_due(runner):
            self._gather(runner)

    def after_train_epoch(self, runner) -> None:
        if get_world_size() > 1:
            self._gather(runner)

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        if self._val_states is not None:  # saved during validation: the states training continues with
            states = self._val_gathered if get_world_size() > 1 else [self._val_states]
        elif get_world_size() == 1:
            states = [capture_random_states()]
        elif self._gathered is not None and self._gathered['stamp'] == self._stamp(runner):
            states = self._gathered['states']
        else:
            print_log('RandomStateHook: this checkpoint is saved at a point where the RNG states of the other ranks '
                      'were not gathered; it holds none, and training resumed from it will not be bit-identical',
                      logger='current', level=logging.WARNING)
            return
        checkpoint['random_states'] = list(states)

    # ---------------------------------------------------------------------------------------------- resuming
    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        if not getattr(runner, '_resume', False):
            return  # load_from (fine-tuning, testing): the states belong to another run
        self._resume_states = None
        saved = checkpoint.get('random_states')
        world_size = get_world_size()
        if saved is None:
            print_log('RandomStateHook: the resumed checkpoint holds no RNG states (saved without this hook); '
                      'training continues, but not bit-identical to an uninterrupted run',
                      logger='current', level=logging.WARNING)
        elif len(saved) != world_size:
            print_log(f'RandomStateHook: the resumed checkpoint holds the RNG states of {len(saved)} process(es) '
                      f'but this run has {world_size}; they are not restored: training continues, but not '
                      'bit-identical to an uninterrupted run', logger='current', level=logging.WARNING)
        else:
            self._resume_states = saved[get_rank()]

    def _restore_resumed(self):
        states, self._resume_states = self._resume_states, None
        restore_random_states(states)
        print_log('RandomStateHook: RNG states restored from the resumed checkpoint', logger='current')

    def before_train_epoch(self, runner) -> None:
        if self._resume_states is None:
            return
        loop = runner.train_loop
        loader = getattr(loop, 'dataloader', None)
        if getattr(loader, 'persistent_workers', False) and getattr(loader, 'num_workers', 0) > 0:
            print_log('RandomStateHook: the training dataloader has persistent workers, whose generators are not in '
                      'the checkpoint (the new workers start from the seed); training is not bit-identical to an '
                      'uninterrupted run (persistent_workers=False makes it so)', logger='current',
                      level=logging.WARNING)
        if hasattr(loop, 'dataloader_iterator'):  # IterBasedTrainLoop: restore after it skips the trained batches
            loop.dataloader_iterator = _RestoreBeforeFetch(loop, loop.dataloader_iterator, loop.iter,
                                                           self._restore_resumed)
            return
        try:
            mid_epoch = loop.iter != loop.epoch * len(loop.dataloader)
        except TypeError:  # a dataloader without a length
            mid_epoch = False
        if mid_epoch:
            print_log(f'RandomStateHook: the checkpoint was saved in the middle of an epoch (iter {loop.iter}); '
                      f'mmengine restarts epoch {loop.epoch + 1} from its first batch, so training is not '
                      'bit-identical to an uninterrupted run', logger='current', level=logging.WARNING)
        self._restore_resumed()

    # -------------------------------------------------------------------------------------------- validation
    def before_val(self, runner) -> None:
        self._val_states = capture_random_states()
        self._val_gathered = all_gather_object(self._val_states) if get_world_size() > 1 else None

    def after_val(self, runner) -> None:
        if self._val_states is not None:
            restore_random_states(self._val_states)
        self._val_states = self._val_gathered = None
