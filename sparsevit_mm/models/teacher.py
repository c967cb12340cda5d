"""A frozen dense teacher for distillation, built from any mmpretrain config and checkpoint."""
from typing import NamedTuple, Optional, Union

import torch
import torch.nn as nn
from mmengine.config import ConfigDict
from mmengine.logging import print_log

from ..utils.checkpoint import load_weights
from ..utils.config import read_config
from .backbones.base import SparseBackbone
from .heads import TokenLabelingClsHead


class TeacherOutputs(NamedTuple):
    logits: torch.Tensor  # (B, num_classes)
    patch_tokens: Optional[torch.Tensor]  # (B, N, C) final normed patch tokens
    token_logits: Optional[torch.Tensor]  # (B, N, num_classes) for token-labeling heads


class FrozenTeacher:
    """The dense model a DynamicViT student distils from.

    Deliberately not an ``nn.Module`` attribute of the student: its weights stay out of the student's
    checkpoints, optimizer and DDP; it is moved to the student's device on first use.

    Args:
        config: an mmpretrain config file (``'mmpretrain::deit/deit-small_4xb256_in1k.py'`` works) whose
            ``model`` is the teacher. Give ``config`` or ``model``.
        model: the teacher's model config dict itself.
        checkpoint: the teacher's weights (required for real training; loaded strictly).
        token_layer: the module whose output (B, extra + N, C) gives the teacher's token features, e.g.
            ``'backbone.ln1'`` for mmpretrain's VisionTransformer. Default: our backbones report their tokens
            directly; mmpretrain ViTs use ``backbone.ln1``.
    """

    def __init__(self, config: Optional[str] = None, model: Optional[dict] = None,
                 checkpoint: Optional[str] = None, token_layer: Optional[str] = None):
        if (config is None) == (model is None):
            raise ValueError('teacher needs exactly one of `config` (an mmpretrain config file) or `model` '
                             f'(a model dict); got config={config!r}, model={model!r}')
        if config is not None:
            model = read_config(config).model
        from mmengine.registry import DefaultScope
        from mmpretrain.registry import MODELS
        with DefaultScope.overwrite_default_scope('mmpretrain'):  # whichever scope a run has made the default
            self.model: nn.Module = MODELS.build(ConfigDict(model) if isinstance(model, dict) else model)
        self.model.requires_grad_(False).eval()
        self.checkpoint = checkpoint
        self.token_layer = token_layer
        self._captured = {}
        self._hook = None
        self._loaded = False

    def __deepcopy__(self, memo):
        # Frozen and shared: copies of the student (e.g. the EMA model) use the same teacher.
        return self

    def load(self):
        """Initialise, then load the checkpoint strictly (called from the student's ``init_weights``)."""
        self.model.init_weights()
        if self.checkpoint is None:
            print_log('the distillation teacher has no checkpoint: it stays randomly initialised', logger='current',
                      level=30)
        else:
            load_weights(self.model, self.checkpoint, source=f'teacher checkpoint {self.checkpoint}')
        self.model.requires_grad_(False).eval()
        self._loaded = True

    def _token_module(self) -> Optional[nn.Module]:
        name = self.token_layer
        if name is None and hasattr(self.model.backbone, 'ln1'):
            name = 'backbone.ln1'
        if name is None:
            return None
        modules = dict(self.model.named_modules())
        if name not in modules:
            raise ValueError(f'teacher has no module {name!r} to read token features from')
        return modules[name]

    @torch.no_grad()
    def __call__(self, inputs: torch.Tensor, need_tokens: bool = True) -> TeacherOutputs:
        model = self.model
        param = next(model.parameters())
        if param.device != inputs.device:
            model.to(inputs.device)
        model.eval()
        tokens = None
        if isinstance(model.backbone, SparseBackbone) and self.token_layer is None:
            result = model.backbone.forward_sparse(inputs)
            feats, tokens = result.outs, result.patch_tokens
        else:
            if need_tokens and self._hook is None:
                module = self._token_module()
                if module is not None:
                    self._hook = module.register_forward_hook(
                        lambda _m, _i, out: self._captured.__setitem__('tokens', out))
            self._captured.clear()
            feats = model.backbone(inputs)
            if 'tokens' in self._captured:
                extra = getattr(model.backbone, 'num_extra_tokens', 1)
                tokens = self._captured.pop('tokens')[:, extra:]
        if getattr(model, 'neck', None) is not None:
            feats = model.neck(feats)
        head = model.head
        if isinstance(head, TokenLabelingClsHead):
            logits, token_logits = head.cls_logits(feats), head.token_logits(feats)
        else:
            logits, token_logits = head(feats), None
        return TeacherOutputs(logits, tokens, token_logits)


def build_teacher(teacher: Union[None, dict, FrozenTeacher]) -> Optional[FrozenTeacher]:
    if teacher is None or isinstance(teacher, FrozenTeacher):
        return teacher
    return FrozenTeacher(**teacher)
