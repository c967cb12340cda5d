"""Checkpoint layout conversions (one module per model family); ``tools/model_converters`` are their CLIs."""
from typing import Dict

import torch
import torch.nn as nn


def adapt_state_dict(model: nn.Module, state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Convert a full-model checkpoint (official or ours) to ``model``'s keys, by the kind of its backbone.

    Models whose backbone is not one of ours get the state dict unchanged.
    """
    from ..models.backbones import DynamicViT
    backbone = getattr(model, 'backbone', None)
    if isinstance(backbone, DynamicViT):
        from .dynamicvit import to_classifier_state_dict
        return to_classifier_state_dict(state_dict)
    return state_dict
