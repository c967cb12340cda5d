"""DynamicViT learns to keep the informative tokens.

Images are grey noise with one coloured square; the colour is the label, so only the square's patch matters.
After a short training with the DynamicViT objective (classification + keep ratio) the kept tokens should cover
the square far more often than chance.
"""
import numpy as np
import torch
import torch.nn.functional as F

from sparsevit_mm.layers import keep_ratio_loss
from sparsevit_mm.models import DynamicViT

from .helpers import object_image


def batch(rng, size):
    labels = rng.integers(0, 4, size=size)
    images, where = zip(*(object_image(rng, int(y), size=32, patch=8) for y in labels))
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float()
    return (x - 110.0) / 60.0, torch.from_numpy(labels), torch.tensor(where)


def test_kept_tokens_cover_the_object():
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    # 16 patch tokens; one pruning stage keeps 4 of them (chance of covering the object: 25%). It sits before
    # block 0, so no attention has copied the object's colour into other tokens before the decision.
    model = DynamicViT(arch=dict(embed_dims=64, num_layers=3, num_heads=4, mlp_ratio=2.0), img_size=32, patch_size=8,
                       prune_layers=[0], keep_ratio=0.25)
    model.init_weights()
    head = torch.nn.Linear(64, 4)
    # A moderate lr: with Adam at 2e-3 the predictor can saturate at "keep all" before the keep-ratio loss acts
    # (the recipes warm the lr up for the same reason).
    optimizer = torch.optim.AdamW([*model.parameters(), *head.parameters()], lr=5e-4, weight_decay=0.0)

    def coverage():
        model.eval()
        x, _, where = batch(np.random.default_rng(123), 256)
        with torch.no_grad():
            kept = model.forward_sparse(x).kept_indices[-1]
        model.train()
        return (kept == where[:, None]).any(1).float().mean().item()

    before = coverage()
    for _ in range(300):
        x, y, _ = batch(rng, 32)
        result = model.forward_sparse(x)
        loss = F.cross_entropy(head(result.outs[0]), y) + 2.0 * keep_ratio_loss(result.keep_decisions,
                                                                                 model.stage_ratios)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = coverage()
    assert after > 0.6, f'kept tokens cover the object in {after:.0%} of images (chance 25%, before {before:.0%})'
    assert after > before + 0.2
