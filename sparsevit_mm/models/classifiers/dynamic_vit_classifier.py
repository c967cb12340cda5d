"""The DynamicViT training objective as an mmpretrain classifier."""
from typing import List, Optional, Union

import torch
from mmpretrain.models.classifiers import ImageClassifier
from mmpretrain.structures import DataSample

from ...layers import keep_ratio_terms
from ...utils.checkpoint import CheckpointLayoutMixin, StateDict, convert_framework_model_layout
from ..backbones.base import SparseBackbone
from ..heads import TokenLabelingClsHead
from ..losses import logit_distillation_loss, token_distillation_loss
from ..teacher import FrozenTeacher, build_teacher


class DynamicViTClassifier(CheckpointLayoutMixin, ImageClassifier):
    """``ImageClassifier`` whose training loss is the full DynamicViT objective.

    ``loss_cls`` (the head's loss) + ``loss_keep_ratio`` (per stage, squared error between each sample's kept
    fraction and the stage target, averaged over stages) + ``loss_distill_logits`` (KL from the frozen dense
    teacher) + ``loss_distill_tokens`` (on the tokens kept at the last stage: MSE of final features, or KL of
    per-token logits for LV-ViT). The kept fraction of every stage is logged as ``keep_ratio_stage{s}``.

    Args:
        backbone / neck / head / train_cfg / data_preprocessor / init_cfg: as :class:`ImageClassifier`; the
            backbone must be a token-sparse backbone such as ``DynamicViT``.
        teacher: ``dict(checkpoint=...)``: the dense version of the student (same backbone at keep_ratio 1.0, same
            neck and head), as the official recipes; or any model: ``dict(config=..., checkpoint=...)`` /
            ``dict(model=..., checkpoint=...)`` (see :class:`FrozenTeacher`); None trains without distillation.
        keep_ratio_weight / distill_logits_weight / distill_tokens_weight: loss weights (paper: 2.0, 0.5, 0.5).
        token_distill: ``'mse'`` (DeiT: final token features) or ``'kl'`` (LV-ViT: per-token logits).
    """
    pretrained_may_lack = (r'^head\.', )  # a backbone-only checkpoint in init_cfg leaves the head to its init

    def __init__(self, backbone: dict, neck: Optional[dict] = None, head: Optional[dict] = None,
                 teacher: Union[None, dict, FrozenTeacher] = None, keep_ratio_weight: float = 2.0,
                 distill_logits_weight: float = 0.5, distill_tokens_weight: float = 0.5,
                 token_distill: str = 'mse', pretrained: Optional[str] = None, train_cfg: Optional[dict] = None,
                 data_preprocessor: Optional[dict] = None, init_cfg: Optional[dict] = None):
        if isinstance(teacher, dict) and 'config' not in teacher and 'model' not in teacher:
            # The official recipe: the teacher is the dense version of the student's own architecture.
            teacher = dict(teacher, model=dict(type='ImageClassifier', backbone=dict(backbone, keep_ratio=1.0,
                                                                                      init_cfg=None),
                                               neck=neck, head=head))
        super().__init__(backbone, neck, head, pretrained, train_cfg, data_preprocessor, init_cfg)
        if not isinstance(self.backbone, SparseBackbone):
            raise TypeError(f'DynamicViTClassifier needs a token-sparse backbone (a SparseBackbone), got '
                            f'{type(self.backbone).__name__}')
        weights = dict(keep_ratio_weight=keep_ratio_weight, distill_logits_weight=distill_logits_weight,
                       distill_tokens_weight=distill_tokens_weight)
        negative = {name: value for name, value in weights.items() if not value >= 0}
        if negative:
            raise ValueError(f'loss weights must be >= 0 (a negative weight rewards what the loss penalises; 0 turns '
                             f'the term off), got {negative}')
        if token_distill not in ('mse', 'kl'):
            raise ValueError(f"token_distill must be 'mse' or 'kl', got {token_distill!r}")
        self.teacher = build_teacher(teacher)  # a plain attribute: not a submodule (see FrozenTeacher)
        self.keep_ratio_weight = keep_ratio_weight
        self.distill_logits_weight = distill_logits_weight
        self.distill_tokens_weight = distill_tokens_weight
        self.token_distill = token_distill

    def convert_checkpoint(self, state_dict: StateDict, checkpoint: Optional[dict] = None) -> StateDict:
        """Ours, an official DynamicViT / DeiT / LV-ViT / timm classifier, or mmpretrain's ViT names -> our keys.
        Whatever is loaded into the whole classifier is checked whole (head included), by any loader: an
        inferencer given a checkpoint without a head refuses it instead of predicting with a random one."""
        return convert_framework_model_layout(self, state_dict)

    def init_weights(self):
        """The one rule of :class:`~sparsevit_mm.utils.CheckpointLayoutMixin` (``init_cfg=dict(type='Pretrained',
        checkpoint=...)`` of the whole classifier: ours or official, DeiT, LV-ViT, DynamicViT; a dense checkpoint may
        lack the score predictors and a backbone-only one the head), then the teacher loads its weights."""
        super().init_weights()
        if self.teacher is not None:
            self.teacher.load()

    def _logits(self, feats) -> torch.Tensor:
        head = self.head
        return head.cls_logits(feats) if isinstance(head, TokenLabelingClsHead) else head(feats)

    def loss(self, inputs: torch.Tensor, data_samples: List[DataSample]) -> dict:
        result = self.backbone.forward_sparse(inputs)
        feats = self.neck(result.outs) if self.with_neck else result.outs
        logits = self._logits(feats)
        losses = {f'{k}_cls' if k == 'loss' else k: v for k, v in self.head._get_loss(logits, data_samples).items()}

        if result.keep_decisions:
            losses.update(keep_ratio_terms(result.keep_decisions, self.backbone.stage_ratios, self.keep_ratio_weight))

        if self.teacher is not None:
            need_tokens = self.distill_tokens_weight > 0
            teacher = self.teacher(inputs, need_tokens=need_tokens)
            losses['loss_distill_logits'] = self.distill_logits_weight * logit_distillation_loss(logits,
                                                                                                 teacher.logits)
            if need_tokens:
                keep_mask = result.token_mask
                if self.token_distill == 'kl':
                    if teacher.token_logits is None or not isinstance(self.head, TokenLabelingClsHead):
                        raise ValueError("token_distill='kl' needs token-labeling heads (TokenLabelingClsHead) "
                                         'on both student and teacher')
                    student_tokens, teacher_tokens = self.head.token_logits(feats), teacher.token_logits
                else:
                    if teacher.patch_tokens is None:
                        raise ValueError('the teacher exposes no token features; set teacher token_layer to the '
                                         "module that outputs its final tokens (e.g. 'backbone.ln1')")
                    student_tokens, teacher_tokens = result.patch_tokens, teacher.patch_tokens
                losses['loss_distill_tokens'] = self.distill_tokens_weight * token_distillation_loss(
                    student_tokens, teacher_tokens, keep_mask, self.token_distill)
        return losses
