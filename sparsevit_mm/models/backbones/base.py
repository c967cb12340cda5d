"""What every sparsevit-mm backbone shares: the forward contract, arch lookup, and checked pretrained loading;
and the checkpoint-layout helpers that the Swin and ConvNeXt conversions share."""
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from mmengine.model import BaseModule
from torch.nn.modules.batchnorm import _BatchNorm

from ...layers import SlowFastRouting, num_kept, sample_keep_decision, split_by_score, stage_keep_ratios
from ...utils.arch import resolve_arch
from ...utils.checkpoint import CheckpointLayoutMixin, StateDict


@dataclass
class TokenSparsityResult:
    """Everything one forward pass of a sparse backbone produced.

    Attributes:
        outs: what ``forward`` returns (one entry per ``out_indices``).
        keep_decisions: training only; per stage the (B, N) 0/1 keep (or slow-path) mask, differentiable.
        kept_indices: inference only; per stage the (B, K_s) indices of the positions kept (or sent to the slow
            path), in absolute patch / map positions.
        patch_tokens: the final normed tokens (B, N, C) a teacher's are compared with in distillation.
        token_mask: (B, N) which of ``patch_tokens`` distillation covers (None: all of them).
        grid: (H, W) of the token grid at the sparse stage.
    """
    outs: Tuple[torch.Tensor, ...]
    keep_decisions: List[torch.Tensor] = field(default_factory=list)
    kept_indices: List[torch.Tensor] = field(default_factory=list)
    patch_tokens: Optional[torch.Tensor] = None
    token_mask: Optional[torch.Tensor] = None
    grid: Tuple[int, int] = (0, 0)


class SparseBackbone(CheckpointLayoutMixin, BaseModule):
    """Base class of the dynamic backbones.

    Subclasses implement ``forward_sparse(images) -> TokenSparsityResult`` and keep ``stage_ratios`` (the target
    keep fraction of each pruning stage). ``forward`` returns the outputs as any mmpretrain / mmdet / mmseg
    backbone does; in training it also leaves the keep decisions in ``pending_keep_decisions`` for
    :class:`~sparsevit_mm.engine.KeepRatioLossHook`, which adds the keep-ratio loss to a detector's or segmentor's
    loss dict.

    Subclasses define ``arch_zoo``, ``default_init()``, ``convert_checkpoint(state_dict, checkpoint=None)`` (any
    supported layout -> this module's keys) and ``optional_checkpoint_groups`` (regular expressions of parameter
    groups a checkpoint may lack as a whole, such as score predictors that a dense checkpoint never had): see
    :class:`~sparsevit_mm.utils.CheckpointLayoutMixin`, which converts and checks whatever is loaded into the
    backbone, by any loader.

    ``init_cfg=dict(type='Pretrained', checkpoint=PATH, prefix=None)`` follows the mixin's one initialisation rule
    instead of mmengine's non-strict loader: the checkpoint is converted from whatever layout it has, and a
    checkpoint that does not fit raises :class:`~sparsevit_mm.utils.CheckpointMismatchError` naming the file and the
    missing, unexpected and mis-shaped keys.
    """
    arch_zoo: Dict[str, dict] = {}
    arch_options: Tuple[str, ...] = ('prune_layers', )  # keys a custom arch dict may have beside the required ones
    optional_checkpoint_groups: Tuple[str, ...] = ()
    default_keep_ratio_weight: float = 2.0
    # how a base keep ratio r becomes per-stage ratios: 'geometric' (r, r^2, r^3: DynamicViT, cumulative) or
    # 'linear' (r, r - 0.2, r - 0.4: dynamic Swin / ConvNeXt, slow-path fractions)
    keep_ratio_schedule: str = 'geometric'
    prune_layers: List[int] = []
    norm_eval: bool = False
    pending_keep_decisions: Optional[List[torch.Tensor]] = None

    def forward_sparse(self, images: torch.Tensor) -> TokenSparsityResult:
        raise NotImplementedError

    # ------------------------------------------------------------------------------------------- budget
    @property
    def keep_ratio(self):
        """The budget knob: set it at any time (config, ``--cfg-options``, attribute); 1.0 is the dense network."""
        return self._keep_ratio

    @keep_ratio.setter
    def keep_ratio(self, value):
        self.stage_ratios = stage_keep_ratios(value, len(self.prune_layers), self.keep_ratio_schedule)
        self._keep_ratio = value

    @property
    def prunes(self) -> bool:
        """Whether any stage drops tokens (or sends positions to the fast path) at the current keep ratio."""
        return any(r < 1.0 for r in self.stage_ratios)

    def route(self, stage: int, tokens: torch.Tensor, result: TokenSparsityResult) -> SlowFastRouting:
        """Slow / fast routing of (B, N, C) map tokens by predictor ``stage`` (each predictor ranks every position).

        Training: a hard Gumbel mask (recorded in ``result.keep_decisions``); inference: the best
        ``stage_ratios[stage]`` of the positions take the slow path (recorded in ``result.kept_indices``).
        """
        log_probs = self.score_predictors[stage](tokens)
        if self.training:
            mask = sample_keep_decision(log_probs)
            result.keep_decisions.append(mask.squeeze(-1))
            return SlowFastRouting(mask=mask)
        slow, fast = split_by_score(log_probs[..., 0], num_kept(tokens.shape[1], self.stage_ratios[stage]))
        result.kept_indices.append(slow)
        return SlowFastRouting.from_indices(slow, fast, tokens.shape[1])

    def forward(self, images: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """(B, 3, H, W) -> tuple with one output per ``out_indices``.

        In training (with autograd on) the keep decisions wait in ``pending_keep_decisions`` for the keep-ratio
        loss; a training forward pass while the previous pass's decisions are still waiting means that nothing
        turns them into that loss, and the model would learn to keep every token: that is an error, which names the
        fix.
        """
        learning = self.training and torch.is_grad_enabled()
        if learning and self.pending_keep_decisions is not None:
            self.pending_keep_decisions = None  # one error, not one per retry
            raise RuntimeError(
                f'{type(self).__name__}: the keep decisions of the previous training step were never turned into the '
                'keep-ratio loss, so the model would train without its budget. Add '
                "custom_hooks = [dict(type='KeepRatioLossHook')] to the config (sparsevit-mm's tools/train.py adds it "
                "by itself); dict(type='KeepRatioLossHook', weight=0.0) trains without the loss on purpose. A custom "
                'training loop calls backbone.pop_keep_decisions() after each forward pass.')
        result = self.forward_sparse(images)
        self.pending_keep_decisions = result.keep_decisions if learning and result.keep_decisions else None
        return result.outs

    def pop_keep_decisions(self) -> Optional[List[torch.Tensor]]:
        """The keep decisions of the last training forward pass (per stage, (B, N)), handed over once."""
        decisions, self.pending_keep_decisions = self.pending_keep_decisions, None
        return decisions

    def _freeze_stages(self):
        pass

    def train(self, mode: bool = True):
        super().train(mode)
        self._freeze_stages()
        if mode and self.norm_eval:
            for module in self.modules():
                if isinstance(module, _BatchNorm):
                    module.eval()
        return self

    @classmethod
    def resolve_arch(cls, arch: Union[str, dict], required: Sequence[str]) -> dict:
        """``arch`` (a name in ``arch_zoo`` or a dict with ``required`` and any of ``arch_options``) -> settings."""
        return resolve_arch(cls.__name__, arch, cls.arch_zoo, required, cls.arch_options)

    @staticmethod
    def resolve_out_indices(out_indices: Union[int, Sequence[int]], num: int) -> List[int]:
        """``out_indices`` (an int or a sequence of ints, negatives counting from the end) -> sorted indices in
        [0, num); out-of-range, non-integer and repeated entries are refused (one output per index)."""
        indices = [out_indices] if isinstance(out_indices, int) else list(out_indices)
        resolved = []
        for index in indices:
            if isinstance(index, bool) or not isinstance(index, int):
                raise ValueError(f'out_indices {indices}: {index!r} is not an integer layer / stage index')
            if not -num <= index < num:
                raise ValueError(f'out_indices {indices}: {index} is out of range for {num} layers/stages')
            resolved.append(index % num)
        repeated = sorted({i for i in resolved if resolved.count(i) > 1})
        if repeated:
            raise ValueError(f'out_indices {indices} name layer / stage {repeated} more than once (negative indices '
                             f'count from the end of {num}); give each once')
        return sorted(resolved)


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoint layouts shared by DynamicSwinTransformer and DynamicConvNeXt (their conversions sit beside them):
# checkpoints trained with mmpretrain / mmdet / mmseg load as they are once ``backbone.`` prefixes are stripped;
# the official dynamic versions name the score predictors as below.
# ---------------------------------------------------------------------------------------------------------------------

_HEAD_PREFIXES = ('head.', 'neck.', 'data_preprocessor.')


def strip_model_prefix(state_dict: StateDict) -> StateDict:
    """A full detector / segmentor / classifier checkpoint -> its ``backbone.*`` part, prefix removed."""
    if any(k.startswith('backbone.') for k in state_dict):
        return {k[len('backbone.'):]: v for k, v in state_dict.items() if k.startswith('backbone.')}
    return dict(state_dict)


def _zoo_name(zoo: dict, arch: dict):
    for name, settings in zoo.items():
        if all(list(settings[k]) == list(v) if isinstance(v, (list, tuple)) else settings[k] == v
               for k, v in arch.items()):
            return name
    return None
