"""Weight initialisation shared by the transformer models."""
import torch.nn as nn
from mmengine.model.weight_init import trunc_normal_


def init_vit_weights(module: nn.Module, *embeddings: nn.Parameter, std: float = 0.02):
    """timm's ViT init: truncated normal (std 0.02) for every Linear weight and the given embeddings, zero biases,
    LayerNorms at weight 1 / bias 0."""
    for embedding in embeddings:
        trunc_normal_(embedding, std=std)
    for sub in module.modules():
        if isinstance(sub, nn.Linear):
            trunc_normal_(sub.weight, std=std)
            if sub.bias is not None:
                nn.init.zeros_(sub.bias)
        elif isinstance(sub, nn.LayerNorm):
            nn.init.ones_(sub.weight)
            nn.init.zeros_(sub.bias)
