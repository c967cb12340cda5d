"""Training hooks of the sparsevit-mm recipes."""
import numbers
from typing import Optional, Sequence

from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmengine.runner.checkpoint import find_latest_checkpoint

from ..layers import keep_ratio_terms
from ..models.backbones.base import SparseBackbone
from ..utils.checkpoint import CheckpointMismatchError, check_fit, convert_for_model


class FreezeBackboneHook(Hook):
    """Keep the pretrained backbone still for the first ``epochs`` while the new modules learn.

    DynamicViT's recipe trains only the score predictors (and other new modules) for the first 5 epochs, then the
    whole network with the backbone at a reduced lr. Here the learning rate of every backbone parameter outside
    ``trainable`` is set to 0 for each iteration of those epochs (AdamW's decoupled weight decay scales with the lr,
    so the weights do not move) and restored right after the step, before the lr schedulers update it. The
    optimizer, DDP and checkpoints are untouched.

    Args:
        epochs: how many epochs the backbone stays frozen.
        module: the attribute holding the backbone.
        trainable: name fragments of backbone parameters that train from the start.
    """
    priority = 'NORMAL'  # before ParamSchedulerHook (LOW) in after_train_iter

    def __init__(self, epochs: int = 5, module: str = 'backbone',
                 trainable: Sequence[str] = ('score_predictors', 'fast_path')):
        if epochs < 0:
            raise ValueError(f'epochs must be >= 0, got {epochs}')
        self.epochs = epochs
        self.module = module
        self.trainable = tuple(trainable)
        self._groups = None
        self._saved = []

    def _frozen_groups(self, runner):
        if self._groups is None:
            model = runner.model.module if is_model_wrapper(runner.model) else runner.model
            frozen = {id(p) for name, p in getattr(model, self.module).named_parameters()
                      if not any(t in name for t in self.trainable)}
            self._groups, mixed = [], False
            for group in runner.optim_wrapper.optimizer.param_groups:
                in_backbone = [id(p) in frozen for p in group['params']]
                if in_backbone and all(in_backbone):
                    self._groups.append(group)
                elif any(in_backbone):
                    mixed = True
            if mixed:
                raise ValueError('FreezeBackboneHook needs the backbone in parameter groups of its own; add a '
                                 f"paramwise_cfg custom key for '{self.module}' (e.g. lr_mult=0.01)")
        return self._groups

    def before_train_iter(self, runner, batch_idx: int, data_batch=None):
        if runner.epoch >= self.epochs:
            return
        groups = self._frozen_groups(runner)
        self._saved = [g['lr'] for g in groups]
        for group in groups:
            group['lr'] = 0.0

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None):
        for group, lr in zip(self._groups or [], self._saved):
            group['lr'] = lr
        self._saved = []


class KeepRatioLossHook(Hook):
    """Adds the backbone's keep-ratio loss to any model's loss dict (detectors, segmentors, classifiers).

    mmdet's and mmseg's models build their loss dicts from their heads only. This hook wraps the model's ``loss``
    once, before training: after the original loss it takes the keep decisions the sparse backbone left from that
    forward pass and adds ``loss_keep_ratio`` (weight x mean over stages of the squared error between each sample's
    kept fraction and the stage target) plus ``keep_ratio_stage{s}`` for the log. Works under DDP (the wrapped
    method is the module's own). ``tools/train.py`` adds this hook by itself when the backbone is one of ours;
    with other training scripts add ``custom_hooks = [dict(type='KeepRatioLossHook')]``.

    Args:
        weight: loss weight; None takes the backbone's default (DynamicViT 2.0, Swin / ConvNeXt 10.0, as the
            official recipes).
    """
    priority = 'NORMAL'

    def __init__(self, weight: Optional[float] = None):
        if weight is not None and (isinstance(weight, bool) or not isinstance(weight, numbers.Real) or
                                   not weight >= 0):
            raise ValueError(f'KeepRatioLossHook weight must be >= 0 (a negative weight rewards missing the budget; '
                             f'0 trains without the keep-ratio loss), got {weight!r}')
        self.weight = weight

    def before_train(self, runner):
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        backbone = getattr(model, 'backbone', None)
        if not isinstance(backbone, SparseBackbone):
            raise TypeError(f'KeepRatioLossHook needs a model with a sparse backbone (DynamicViT, '
                            f'DynamicSwinTransformer, DynamicConvNeXt); got {type(backbone).__name__}')
        if getattr(model, '_keep_ratio_loss_wrapped', False):
            return
        weight = self.weight if self.weight is not None else backbone.default_keep_ratio_weight
        original_loss = model.loss

        def loss_with_keep_ratio(*args, **kwargs):
            losses = original_loss(*args, **kwargs)
            decisions = backbone.pop_keep_decisions()
            if decisions:
                if 'loss' in losses:  # mmpretrain's heads: mmengine would log that key in place of the total
                    losses['loss_cls'] = losses.pop('loss')
                losses.update(keep_ratio_terms(decisions, backbone.stage_ratios, weight))
            return losses

        model.loss = loss_with_keep_ratio
        model._keep_ratio_loss_wrapped = True


class CheckpointLayoutHook(Hook):
    """Converts a checkpoint of any supported layout as the runner loads it, and refuses one that does not fit.

    mmengine's ``load_from`` / ``resume`` (what ``tools/test.py CONFIG CKPT`` uses) only warn about missing,
    unexpected or mis-shaped keys and then run with random weights. Before the runner puts the weights into the
    model, this hook converts them (official DynamicViT / DeiT / timm / LV-ViT / Swin / ConvNeXt / DVT / U-ViT
    files, mmpretrain / mmdet / mmseg checkpoints, ours) to the model's keys, checks them strictly (only the groups
    the model declares optional, such as a dense checkpoint's score predictors, may be absent), and leaves them
    under ``checkpoint['state_dict']``, where mmengine and the EMA hooks read them. A misfit raises
    :class:`~sparsevit_mm.utils.CheckpointMismatchError` naming the file and the keys, so the tool exits non-zero.

    Our ``tools/train.py`` / ``tools/test.py`` add it to every config; with the frameworks' own tools add
    ``dict(type='CheckpointLayoutHook')`` to ``custom_hooks`` (our configs do). It runs before every other hook
    that reads the loaded checkpoint (priority VERY_HIGH; mmpretrain's EMAHook is ABOVE_NORMAL).
    """
    priority = 'VERY_HIGH'

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        source = runner._load_from or (find_latest_checkpoint(runner.work_dir) if runner._resume else None)
        source = source or 'the checkpoint'
        try:
            state_dict = convert_for_model(model, checkpoint)
            check_fit(model, state_dict, source)
        except CheckpointMismatchError as error:
            message = str(error)
            raise CheckpointMismatchError(message if source in message else f'{source}: {message}') from None
        checkpoint['state_dict'] = state_dict
