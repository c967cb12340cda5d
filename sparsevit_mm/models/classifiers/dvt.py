"""DVT as an mmpretrain classifier: three exits, and inference that really stops early.

Training: the sum of the three exits' classification losses (each exit sees the whole batch; soft targets from
Mixup / CutMix work as in any mmpretrain head). Inference: exit 1 runs on the whole batch; samples whose top softmax
probability reaches ``thresholds[0]`` stop there, only the others run exit 2 (reusing exit 1's features and
relations, gathered for them), and so on. Thresholds come from the config, from a checkpoint (they are buffers of
the model), or from a FLOPs budget and a fitted threshold table (``tools/analysis/dvt_thresholds.py``).

Official DVT checkpoints are converted to its layout by the functions at the end of this file
(:func:`official_dvt_to_ours`, :func:`infer_dvt_arch`).
"""
import math
import numbers
import re
from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from mmengine.registry import DefaultScope
from mmpretrain.models.classifiers.base import BaseClassifier
from mmpretrain.registry import MODELS as PRETRAIN_MODELS
from mmpretrain.structures import DataSample

from ...utils.arch import resolve_arch
from ...utils.checkpoint import CheckpointLayoutMixin, CheckpointMismatchError, StateDict
from ...utils.flops import count_flops
from ..backbones.dvt_exit import DVTExit, ExitState

NO_EXIT = 1e8  # a threshold no confidence reaches


def exit_fraction_targets(q: float, num_exits: int = 3) -> List[float]:
    """DVT's budget law: the fractions of samples leaving at exits 1..K are proportional to q, q^2, ..., q^K."""
    weights = [q ** (k + 1) for k in range(num_exits)]
    return [w / sum(weights) for w in weights]


def fit_thresholds(confidences: torch.Tensor, fractions: Sequence[float]) -> List[float]:
    """Thresholds that make ``fractions`` of the samples leave at each exit (the official greedy rule).

    Args:
        confidences: (K, N) top softmax probability of each exit for N held-out samples.
        fractions: K target fractions (the last exit takes whoever is left).
    Returns:
        K thresholds; exit k takes the samples still running whose confidence is >= threshold k. The last is
        -1e8 (everybody left exits there).
    """
    num_exits, num_samples = confidences.shape
    if len(fractions) != num_exits:
        raise ValueError(f'{len(fractions)} exit fractions for {num_exits} exits')
    running = torch.ones(num_samples, dtype=torch.bool)
    thresholds = []
    for k in range(num_exits - 1):
        quota = int(num_samples * fractions[k])
        threshold = NO_EXIT
        if quota > 0:
            order = confidences[k].argsort(descending=True)
            still = order[running[order]]
            if len(still):
                threshold = float(confidences[k, still[min(quota, len(still)) - 1]])
        thresholds.append(threshold)
        running &= confidences[k] < threshold
    return thresholds + [-NO_EXIT]


class DVTExitStep(nn.Module):
    """Exit ``index`` of a DVT as a function of tensors, with what it hands on explicit (one graph to export).

    ``forward(images[, previous_tokens][, previous_relations])``: the previous exit's final tokens (B, 1 + n, D)
    when this exit reuses features, and its attention logits (B, L * H, 1 + n, 1 + n), all blocks stacked on dim 1,
    when it reuses relations. Returns ``(logits, [tokens], [relations])``: logits (B, classes), then what the next
    exit reuses, in the order it takes them.
    """

    def __init__(self, dvt: 'DVT', index: int):
        super().__init__()
        self.exit, self.head = dvt.exits[index], dvt.heads[index]
        self.previous_grid = dvt.exits[index - 1].grid if index > 0 else None
        following = dvt.exits[index + 1] if index + 1 < len(dvt.exits) else None
        self.hands_on_tokens = bool(following is not None and following.feature_reuse)
        self.hands_on_relations = bool(following is not None and following.relation_reuse)
        self.input_names = ('images', ) + (('previous_tokens', ) if self.exit.feature_reuse else ()) + \
            (('previous_relations', ) if self.exit.relation_reuse else ())
        self.output_names = ('logits', ) + (('tokens', ) if self.hands_on_tokens else ()) + \
            (('relations', ) if self.hands_on_relations else ())
        self.training = dvt.training  # the flag only: the exits and heads keep their own modes

    def forward(self, images: torch.Tensor, *previous: torch.Tensor):
        handed_on = iter(previous)
        tokens = next(handed_on) if self.exit.feature_reuse else None
        relations = next(handed_on) if self.exit.relation_reuse else None
        state = None
        if tokens is not None or relations is not None:
            # one stacked map stands for the list of per-block maps: the exit concatenates them on dim 1 anyway
            state = ExitState(tokens, [relations] if relations is not None else None, None, self.previous_grid)
        state = self.exit.forward_exit(images, state, need_relations=self.hands_on_relations)
        outputs = (self.head(state.features), )
        if self.hands_on_tokens:
            outputs += (state.tokens, )
        if self.hands_on_relations:
            outputs += (torch.cat(state.relations, dim=1), )
        return outputs


def run_early_exit(exits: Sequence[Callable], images: torch.Tensor,
                   thresholds: Sequence[float]) -> Tuple[torch.Tensor, torch.Tensor]:
    """DVT's early exit: exit k runs on the samples still running; those whose top softmax probability reaches
    ``thresholds[k]`` leave with its logits, the others go on with their rows of what exit k hands on.

    Args:
        exits: one callable per exit, ``(images, *handed_on) -> (logits, *handed_on)``: :class:`DVTExitStep` s, or
            exported exits loaded by :func:`sparsevit_mm.deployment.load_exported`.
        thresholds: one per exit (the last one is not used: every sample still running leaves there).
    Returns:
        logits (B, num_classes) and the exit (0-based) of each sample.
    """
    batch = images.shape[0]
    running = torch.arange(batch, device=images.device)
    exit_of = torch.full((batch, ), len(exits) - 1, dtype=torch.long, device=images.device)
    logits, handed_on = None, ()
    for k, run in enumerate(exits):
        exit_logits, *handed_on = run(images[running], *handed_on)
        if logits is None:
            logits = images.new_zeros(batch, exit_logits.shape[1])
        last = k == len(exits) - 1
        leave = torch.ones_like(running, dtype=torch.bool) if last else \
            exit_logits.softmax(-1).amax(-1) >= thresholds[k]
        logits[running[leave]] = exit_logits[leave].to(logits.dtype)
        exit_of[running[leave]] = k
        stay = ~leave
        if last or not stay.any():
            break
        running = running[stay]
        handed_on = [value[stay] for value in handed_on]
    return logits, exit_of


def budget_thresholds(table: torch.Tensor, table_gflops: torch.Tensor, exit_gflops: torch.Tensor,
                      gflops: float) -> List[float]:
    """The row of a fitted threshold ``table`` (settings x exits) whose expected cost (``table_gflops``) is the highest
    within ``gflops`` per image; ``exit_gflops``: the cumulative cost of each exit (0 if not measured)."""
    if len(table) == 0:
        raise ValueError('no fitted threshold table: load a checkpoint written by tools/analysis/'
                         'dvt_thresholds.py (or a converted official DVT checkpoint), or give thresholds')
    cheapest = float(exit_gflops[0]) if float(exit_gflops[0]) > 0 else float(table_gflops.min())
    if gflops < cheapest:
        raise ValueError(f'budget {gflops:.3f} GFLOPs is below the cost of exit 1 ({cheapest:.3f} GFLOPs); '
                         'no threshold can meet it')
    within = (table_gflops <= gflops).nonzero().flatten()
    if len(within) == 0:
        raise ValueError(f'budget {gflops:.3f} GFLOPs is below every fitted setting '
                         f'(from {float(table_gflops.min()):.3f} GFLOPs)')
    return table[within[table_gflops[within].argmax()]].tolist()


class DVT(CheckpointLayoutMixin, BaseClassifier):
    """Dynamic Vision Transformer: a cascade of 7x7 / 10x10 / 14x14-token transformers with early exits.

    Args:
        arch: ``'t2t-vit-12'``, ``'t2t-vit-14'``, ``'deit-small'`` or a dict with ``embed_dims``, ``depth``,
            ``num_heads``, ``mlp_ratio``, ``qkv_bias``, ``tokenizer``.
        num_classes: classes of every exit's head.
        thresholds: confidence thresholds of the exits (3 values, the last is ignored: everybody left exits
            there), or None to run the whole cascade. Saved with the model (a buffer).
        budget: a FLOPs budget (GFLOPs per image) that picks thresholds from the fitted ``threshold_table``
            (loaded from a checkpoint; see ``tools/analysis/dvt_thresholds.py``). Predicting with a budget but no
            table is an error. Give thresholds or a budget, not both.
        feature_reuse / relation_reuse: the two reuse paths (on in the paper).
        drop_path_rate: stochastic depth of every exit.
        loss: the classification loss of each exit (mmpretrain loss config).
        test_cfg: ``dict(mode='early_exit')`` (default) or ``dict(mode='anytime')`` (every exit runs on every
            sample and all exits' scores are reported, for per-exit accuracy).
    """
    arch_zoo = {
        't2t-vit-12': dict(embed_dims=256, depth=12, num_heads=4, mlp_ratio=2.0, qkv_bias=False, tokenizer='t2t'),
        't2t-vit-14': dict(embed_dims=384, depth=14, num_heads=6, mlp_ratio=3.0, qkv_bias=False, tokenizer='t2t'),
        'deit-small': dict(embed_dims=384, depth=12, num_heads=6, mlp_ratio=4.0, qkv_bias=True, tokenizer='patch'),
    }
    grids = (7, 10, 14)

    def __init__(self, arch='t2t-vit-12', num_classes: int = 1000, thresholds: Optional[Sequence[float]] = None,
                 budget: Optional[float] = None, feature_reuse: bool = True, relation_reuse: bool = True,
                 drop_path_rate: float = 0.1, loss: dict = dict(type='CrossEntropyLoss', loss_weight=1.0),
                 test_cfg: Optional[dict] = None, train_cfg: Optional[dict] = None,
                 data_preprocessor: Optional[dict] = None, init_cfg: Optional[dict] = None):
        data_preprocessor = dict(data_preprocessor or {})
        data_preprocessor.setdefault('type', 'ClsDataPreprocessor')
        data_preprocessor.setdefault('batch_augments', train_cfg)
        # mmpretrain's parts, whichever framework's scope is the default (an mmseg or mmdet run may have set it)
        with DefaultScope.overwrite_default_scope('mmpretrain'):
            data_preprocessor = PRETRAIN_MODELS.build(data_preprocessor)
            loss = loss if isinstance(loss, nn.Module) else PRETRAIN_MODELS.build(loss)
        super().__init__(init_cfg=init_cfg, data_preprocessor=data_preprocessor)
        self.arch_name = arch if isinstance(arch, str) else 'custom'
        self.arch = resolve_arch('DVT', arch, self.arch_zoo,
                                 required=('embed_dims', 'depth', 'num_heads', 'mlp_ratio', 'qkv_bias', 'tokenizer'))
        self.exits = nn.ModuleList(
            DVTExit(grid, drop_path_rate=drop_path_rate, feature_reuse=feature_reuse and k > 0,
                    relation_reuse=relation_reuse and k > 0, **self.arch)
            for k, grid in enumerate(self.grids))
        self.heads = nn.ModuleList(nn.Linear(self.arch['embed_dims'], num_classes) for _ in self.grids)
        self.num_classes = num_classes
        self.loss_module = loss
        unknown = sorted(set(test_cfg or {}) - {'mode'})
        if unknown:
            raise ValueError(f"DVT test_cfg takes only 'mode' ('early_exit' or 'anytime'), got {unknown}")
        self.test_cfg = {'mode': 'early_exit', **(test_cfg or {})}
        if self.test_cfg['mode'] not in ('early_exit', 'anytime'):
            raise ValueError(f"test_cfg mode must be 'early_exit' or 'anytime', got {self.test_cfg['mode']!r}")
        # Saved with the model: thresholds in use, cumulative GFLOPs of exits 1..3, and a fitted budget table.
        self.register_buffer('thresholds', torch.full((3, ), NO_EXIT))
        self.register_buffer('exit_gflops', torch.zeros(3))
        self.register_buffer('threshold_table', torch.zeros(0, 3))
        self.register_buffer('threshold_table_gflops', torch.zeros(0))
        if budget is not None:
            if isinstance(budget, bool) or not isinstance(budget, numbers.Real) or not budget > 0:
                raise ValueError(f'budget must be a positive number of GFLOPs per image, got {budget!r}')
            if thresholds is not None:
                raise ValueError(f'give thresholds or a budget, not both (got thresholds={list(thresholds)} and '
                                 f'budget={budget}): a budget picks the thresholds')
        # Thresholds or a budget given in the config win over those stored in a loaded checkpoint.
        self._configured_thresholds = thresholds
        self._budget = budget
        # The table a budget needs usually comes with a checkpoint loaded after construction: until a table has
        # picked the thresholds, the budget is pending and predicting refuses to run the whole cascade silently.
        self._budget_pending = budget is not None
        if thresholds is not None:
            self.set_thresholds(thresholds)
        self.register_load_state_dict_pre_hook(self._keep_configured_thresholds)

    # ------------------------------------------------------------------------------------------ thresholds
    def set_thresholds(self, thresholds: Sequence[float]):
        # plain numbers, also from a tensor (e.g. another model's thresholds)
        thresholds = [t.item() if isinstance(t, torch.Tensor) and t.numel() == 1 else t for t in thresholds]
        bad = [t for t in thresholds if isinstance(t, bool) or not isinstance(t, numbers.Real) or math.isnan(t)]
        if bad:
            raise ValueError(f'DVT thresholds must be numbers (confidences; {NO_EXIT:g} means never exit there), '
                             f'got {bad} in {thresholds}')
        thresholds = [float(t) for t in thresholds]
        if len(thresholds) != len(self.grids):
            raise ValueError(f'DVT needs {len(self.grids)} thresholds (one per exit; the last one only closes the '
                             f'cascade), got {len(thresholds)}: {thresholds}')
        self.thresholds.copy_(torch.tensor(thresholds))
        self._budget_pending = False  # explicit thresholds replace a budget not yet applied

    def set_budget(self, gflops: float):
        """Use the fitted thresholds whose expected cost is the highest within ``gflops`` per image."""
        self.set_thresholds(budget_thresholds(self.threshold_table, self.threshold_table_gflops, self.exit_gflops,
                                              gflops))

    @torch.no_grad()
    def measure_exit_gflops(self, store: bool = True) -> List[float]:
        """Cumulative GFLOPs (multiply-adds) of exits 1..3 for one 224 px image, as the early-exit path runs them."""
        images = torch.zeros(1, 3, 224, 224, device=self.thresholds.device)
        costs = [count_flops(lambda x, k=k: tuple(self.cascade(x, k)), images, module=self) / 1e9
                 for k in range(1, len(self.exits) + 1)]
        if store:
            self.exit_gflops.copy_(torch.tensor(costs))
        return costs

    # Fitted threshold tables differ in length from the empty defaults: they take the checkpoint's shape.
    resizable_checkpoint_keys = ('threshold_table', 'threshold_table_gflops')

    def convert_checkpoint(self, state_dict, checkpoint=None):
        """Official DVT weights (``less_less_token.*`` ...; with the whole ``checkpoint``, also its exit costs and
        threshold table) -> ours; ours pass unchanged."""
        # the whole official file may arrive as the "state dict" (mmengine's loaders pass it on when it has no
        # 'state_dict' entry)
        whole = next((c for c in (checkpoint, state_dict) if isinstance(c, dict) and 'model_state_dict' in c),
                     state_dict)
        weights = whole.get('model_state_dict', whole)
        if not any(k.startswith(('less_less_token.', 'module.less_less_token.')) for k in weights):
            return dict(state_dict)
        return official_dvt_to_ours(whole)[0]

    @staticmethod
    def _keep_configured_thresholds(module, state_dict, prefix, *_):
        """Load pre-hook (after the layout's): thresholds or a budget given in the config win over the checkpoint's
        thresholds, a budget through the checkpoint's table. A checkpoint without a table (e.g. a training one, as
        dvt_thresholds.py loads) leaves the budget pending: the error comes only if the model predicts so."""
        key = prefix + 'thresholds'
        if key not in state_dict:
            return
        configured = module._configured_thresholds
        if configured is None and module._budget is not None:
            table = state_dict.get(prefix + 'threshold_table')
            module._budget_pending = table is None or len(table) == 0
            if not module._budget_pending:
                configured = budget_thresholds(table, state_dict[prefix + 'threshold_table_gflops'],
                                               state_dict[prefix + 'exit_gflops'], module._budget)
        if configured is not None:
            state_dict[key] = torch.tensor([float(t) for t in configured], dtype=state_dict[key].dtype)

    def _apply_pending_budget(self):
        """Pick the thresholds of a configured budget before predicting; an error when there is no table."""
        if not self._budget_pending:
            return
        if len(self.threshold_table) == 0:
            raise ValueError(
                f'DVT was given budget={self._budget} GFLOPs but has no fitted threshold table to pick thresholds '
                'from (none came with the loaded checkpoint, or no checkpoint was loaded). Fit one with '
                '`python tools/analysis/dvt_thresholds.py CONFIG CKPT --budgets '
                f'{self._budget} --out fitted.pth` and test with fitted.pth, or give thresholds=[t1, t2, t3] '
                'instead of the budget')
        self.set_budget(self._budget)

    # ------------------------------------------------------------------------------------------ forward
    def cascade(self, inputs: torch.Tensor, num_exits: int = 3) -> List[torch.Tensor]:
        """Logits (B, num_classes) of the first ``num_exits`` exits, every exit on every sample."""
        logits, state = [], None
        for k in range(num_exits):
            state = self.exits[k].forward_exit(inputs, state, need_relations=k < num_exits - 1)
            logits.append(self.heads[k](state.features))
        return logits

    def extract_feat(self, inputs: torch.Tensor, stage: str = 'exit3'):
        """The normed cls features of every exit (full cascade)."""
        features, state = [], None
        for k, exit_ in enumerate(self.exits):
            state = exit_.forward_exit(inputs, state, need_relations=k < len(self.exits) - 1)
            features.append(state.features)
        return tuple(features)

    def forward(self, inputs: torch.Tensor, data_samples: Optional[List[DataSample]] = None, mode: str = 'tensor'):
        if mode == 'tensor':
            return tuple(self.cascade(inputs))
        if mode == 'loss':
            return self.loss(inputs, data_samples)
        if mode == 'predict':
            return self.predict(inputs, data_samples)
        raise RuntimeError(f'Invalid mode "{mode}".')

    def loss(self, inputs: torch.Tensor, data_samples: List[DataSample]) -> dict:
        if 'gt_score' in data_samples[0]:
            target = torch.stack([s.gt_score for s in data_samples])
        else:
            target = torch.cat([s.gt_label for s in data_samples])
        return {f'loss_exit{k + 1}': self.loss_module(logits, target, avg_factor=logits.size(0))
                for k, logits in enumerate(self.cascade(inputs))}

    @torch.no_grad()
    def early_exit(self, inputs: torch.Tensor):
        """Run the cascade with early exits. Returns logits (B, num_classes) and the exit (0-2) of each sample.

        Only the samples still running enter exit k + 1; the reused features and relations are gathered for them
        (:func:`run_early_exit` over :class:`DVTExitStep` s, as over exported exits).
        """
        self._apply_pending_budget()
        return run_early_exit([DVTExitStep(self, k) for k in range(len(self.exits))], inputs, self.thresholds)

    def predict(self, inputs: torch.Tensor, data_samples: Optional[List[DataSample]] = None) -> List[DataSample]:
        self._apply_pending_budget()
        if self.test_cfg['mode'] == 'anytime':
            all_logits = torch.stack(self.cascade(inputs), dim=1)  # (B, 3, num_classes)
            confidences = all_logits.softmax(-1).amax(-1)
            passes = confidences >= self.thresholds.to(confidences)
            passes[:, -1] = True
            exit_of = passes.float().argmax(dim=1)
            logits = all_logits[torch.arange(len(exit_of)), exit_of]
        else:
            all_logits = None
            logits, exit_of = self.early_exit(inputs)
        scores = logits.softmax(-1)
        data_samples = data_samples if data_samples is not None else [DataSample() for _ in range(len(scores))]
        for i, sample in enumerate(data_samples):
            sample.set_pred_score(scores[i]).set_pred_label(scores[i].argmax(keepdim=True))
            sample.set_field(int(exit_of[i]), 'exit_index', field_type='metainfo')
            sample.set_field(self.exit_gflops.tolist(), 'exit_gflops', field_type='metainfo')
            if all_logits is not None:
                sample.set_field(all_logits[i].softmax(-1), 'exit_scores', field_type='data')
        return data_samples


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoint layouts: official DVT checkpoints (``model_state_dict``, ``flops``, ``dynamic_threshold`` ...) -> ours
# ---------------------------------------------------------------------------------------------------------------------

_EXITS = (('less_less_token.', 0), ('less_token.', 1), ('normal_token.', 2))
_RENAMES = (('tokens_to_token.attention1.', 'tokenizer.mixer1.'), ('tokens_to_token.attention2.', 'tokenizer.mixer2.'),
            ('tokens_to_token.project.', 'tokenizer.project.'), ('patch_embed.proj.', 'tokenizer.proj.'),
            ('.feature_resuse_mlp.', '.feature_reuse.'), ('relation_reuse_conv.', 'relation_reuse.'))


def official_dvt_to_ours(checkpoint: dict) -> Tuple[StateDict, dict]:
    """An official DVT checkpoint -> (our DVT state dict, arch dict).

    The stored exit costs (``flops``), the fitted 59 x 3 ``dynamic_threshold`` table and the GFLOPs of its rows
    (``budgeted_batch_classification[0]``) become the model's ``exit_gflops`` / ``threshold_table`` /
    ``threshold_table_gflops`` buffers, so ``DVT(budget=...)`` picks thresholds from them.
    """
    state_dict = checkpoint.get('model_state_dict', checkpoint)
    out = {}
    for key, value in state_dict.items():
        key = key[len('module.'):] if key.startswith('module.') else key
        for prefix, index in _EXITS:
            if key.startswith(prefix):
                rest = key[len(prefix):]
                break
        else:
            raise CheckpointMismatchError(f'unexpected key {key!r}: official DVT keys start with less_less_token. / '
                                          'less_token. / normal_token.')
        if rest.startswith('head.'):
            out[f'heads.{index}.{rest[len("head."):]}'] = value
            continue
        for old, new in _RENAMES:
            rest = rest.replace(old, new)
        rest = re.sub(r'^(tokenizer\.mixer\d)\.w$', r'\1.random_features', rest)
        out[f'exits.{index}.{rest}'] = value
    # The model's buffers: no early exit until thresholds or a budget are chosen.
    out['thresholds'] = torch.full((3, ), 1e8)
    out['exit_gflops'] = torch.as_tensor(checkpoint.get('flops', [0.0, 0.0, 0.0]), dtype=torch.float32).flatten()
    table, budgeted = checkpoint.get('dynamic_threshold'), checkpoint.get('budgeted_batch_classification')
    if table is not None and budgeted is not None:
        out['threshold_table'] = torch.as_tensor(table, dtype=torch.float32)
        out['threshold_table_gflops'] = torch.as_tensor(budgeted[0], dtype=torch.float32)
    else:
        out['threshold_table'], out['threshold_table_gflops'] = torch.zeros(0, 3), torch.zeros(0)
    return out, infer_dvt_arch(out)


def infer_dvt_arch(state_dict: StateDict) -> dict:
    """The DVT arch dict read off our-layout weights (heads from the relation-reuse channels)."""
    try:
        embed_dims = state_dict['exits.0.cls_token'].shape[-1]
        depth = 1 + max(int(k.split('.')[3]) for k in state_dict if k.startswith('exits.0.blocks.'))
        hidden = state_dict['exits.0.blocks.0.mlp.fc1.weight'].shape[0]
        relation_channels = state_dict['exits.1.relation_reuse.2.weight'].shape[0]
    except (KeyError, ValueError) as error:
        raise CheckpointMismatchError(f'cannot read the DVT arch off this checkpoint: missing {error}') from error
    return dict(embed_dims=embed_dims, depth=depth, num_heads=relation_channels // depth,
                mlp_ratio=hidden / embed_dims, qkv_bias='exits.0.blocks.0.attn.qkv.bias' in state_dict,
                tokenizer='t2t' if 'exits.0.tokenizer.project.weight' in state_dict else 'patch')
