"""Build a model from a config (and a checkpoint) for inference, analysis and visualisation tools; convert
official checkpoints."""
from typing import List, Optional, Tuple, Union

import torch
import torch.nn as nn
from mmengine.config import Config, ConfigDict
from mmengine.registry import MODELS, DefaultScope, init_default_scope

from . import registry  # noqa: F401  (our classes in the frameworks' registries)
from .converters import infer_official_model
from .utils.checkpoint import (StateDict, check_fit, convert_for_model, load_checkpoint_file, load_weights,
                               unwrap_state_dict)
from .utils.setup_env import load_config


def init_model(config, checkpoint: Optional[str] = None, device: str = 'cpu',
               cfg_options: Optional[dict] = None) -> nn.Module:
    """The config's model in eval mode on ``device``; the distillation teacher is left out.

    ``checkpoint`` may be a training checkpoint of ours, an mmpretrain / mmdet / mmseg one, or an official one
    (converted on the fly); it must fit, except for the groups the model declares optional (e.g. the score
    predictors a dense checkpoint never had).
    """
    cfg = config if isinstance(config, Config) else load_config(config, cfg_options)
    if isinstance(config, Config) and cfg_options:
        cfg.merge_from_dict(cfg_options)
    init_default_scope(cfg.get('default_scope', 'mmpretrain'))
    model_cfg = cfg.model.copy()
    model_cfg.pop('teacher', None)
    model_cfg.pop('init_cfg', None)  # weights come from `checkpoint`, not from the training initialisation
    model = MODELS.build(model_cfg)
    if checkpoint is not None:
        load_weights(model, checkpoint)
    model.cfg = cfg
    return model.to(torch.device(device)).eval()


def build_model(model_cfg: dict, scope: str = 'mmpretrain') -> nn.Module:
    """A model config -> the model, built in ``scope``'s registry (our classes are in every framework's)."""
    with DefaultScope.overwrite_default_scope(scope):
        return MODELS.build(ConfigDict(model_cfg))


def convert_official(checkpoint: Union[str, dict], num_heads: Optional[int] = None,
                     arch: Union[None, str, dict] = None) -> Tuple[StateDict, dict, List[str]]:
    """An official checkpoint (a path or a loaded one) of any family -> ``(state_dict, model_cfg, notes)``.

    ``model_cfg`` is the whole model the weights fit (read off the checkpoint, see :func:`infer_official_model`);
    the weights are converted by that model and checked against it: a checkpoint that does not fit raises
    :class:`~sparsevit_mm.utils.CheckpointMismatchError` naming the keys. Groups the model declares optional and
    the checkpoint lacks (a dense checkpoint's score predictors) stay absent from ``state_dict``. ``notes`` say what
    had to be guessed (e.g. a head count).
    """
    source = checkpoint if isinstance(checkpoint, str) else 'the checkpoint'
    if isinstance(checkpoint, str):
        checkpoint = load_checkpoint_file(checkpoint)
    state_dict = unwrap_state_dict(checkpoint)
    model_cfg, notes = infer_official_model(state_dict, checkpoint if isinstance(checkpoint, dict) else None,
                                            num_heads, arch)
    model = build_model(model_cfg)
    converted = convert_for_model(model, checkpoint)
    check_fit(model, converted, source)
    return converted, model_cfg, notes
