"""Build a model from a config (and a checkpoint) for inference, analysis and visualisation tools."""
from typing import Optional

import torch
import torch.nn as nn
from mmengine.config import Config
from mmengine.registry import MODELS, init_default_scope

from .converters import adapt_state_dict
from .utils.checkpoint import load_state_dict_checked, load_state_dict_file
from .utils.setup_env import load_config


def init_model(config, checkpoint: Optional[str] = None, device: str = 'cpu',
               cfg_options: Optional[dict] = None) -> nn.Module:
    """The config's model in eval mode on ``device``; the distillation teacher is left out.

    ``checkpoint`` may be a training checkpoint of ours or an official one (converted on the fly); it must fit.
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
        state_dict = adapt_state_dict(model, load_state_dict_file(checkpoint))
        load_state_dict_checked(model, state_dict, checkpoint)
    model.cfg = cfg
    return model.to(torch.device(device)).eval()
