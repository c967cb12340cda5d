#!/usr/bin/env python
"""Show which tokens a DynamicViT keeps: the image, then one panel per pruning stage with dropped patches greyed.

    python tools/visualize_tokens.py demo.jpg CONFIG CHECKPOINT --out tokens.png [--keep-ratio 0.7]
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from mmengine.config import DictAction  # noqa: E402
from PIL import Image  # noqa: E402

from sparsevit_mm.apis import init_model  # noqa: E402


def load_image(path: str, size: int) -> np.ndarray:
    """Resize the short side to size/0.875 (bicubic) and centre-crop size x size, as DeiT's evaluation does."""
    image = Image.open(path).convert('RGB')
    scale = size / 0.875 / min(image.size)
    image = image.resize((max(size, round(image.width * scale)), max(size, round(image.height * scale))),
                         Image.BICUBIC)
    left, top = (image.width - size) // 2, (image.height - size) // 2
    return np.asarray(image.crop((left, top, left + size, top + size)))


def grey_out(image: np.ndarray, kept: np.ndarray, patch: int, grid_w: int, strength: float = 0.75) -> np.ndarray:
    """Blend every patch not in ``kept`` (flat patch indices) towards white."""
    mask = np.ones(image.shape[:2], dtype=bool)
    for index in kept:
        row, col = divmod(int(index), grid_w)
        mask[row * patch:(row + 1) * patch, col * patch:(col + 1) * patch] = False
    out = image.astype(np.float32)
    out[mask] = out[mask] * (1 - strength) + 255 * strength
    return out.astype(np.uint8)


def main(argv=None):
    parser = argparse.ArgumentParser(description='Visualise the tokens kept at each pruning stage')
    parser.add_argument('image')
    parser.add_argument('config')
    parser.add_argument('checkpoint')
    parser.add_argument('--out', default='tokens.png')
    parser.add_argument('--keep-ratio', type=float, default=None, help='override the config\'s keep ratio')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction)
    args = parser.parse_args(argv)

    model = init_model(args.config, args.checkpoint, cfg_options=args.cfg_options)
    backbone = model.backbone
    if not hasattr(backbone, 'forward_sparse'):
        raise ValueError(f'{type(backbone).__name__} does not prune tokens; nothing to visualise')
    if args.keep_ratio is not None:
        backbone.keep_ratio = args.keep_ratio
    patch = backbone.patch_size
    grid_h, grid_w = backbone.grid_size
    image = load_image(args.image, grid_h * patch)
    preprocessor = model.data_preprocessor
    inputs = torch.from_numpy(image).permute(2, 0, 1).float()[None]
    if getattr(preprocessor, 'mean', None) is not None:
        inputs = (inputs - preprocessor.mean.cpu()) / preprocessor.std.cpu()
    with torch.no_grad():
        result = backbone.forward_sparse(inputs)
        logits = model(inputs, mode='tensor')
    panels = [('input', image)]
    for stage, kept in enumerate(result.kept_indices, start=1):
        panels.append((f'stage {stage}: {kept.shape[1]}/{grid_h * grid_w} tokens',
                       grey_out(image, kept[0].numpy(), patch, grid_w)))

    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(panels), figsize=(3 * len(panels), 3.3))
    for axis, (title, panel) in zip(np.atleast_1d(axes), panels):
        axis.imshow(panel)
        axis.set_title(title, fontsize=9)
        axis.axis('off')
    classes = (getattr(model, 'dataset_meta', None) or {}).get('classes')
    label = int(logits.argmax(1))
    fig.suptitle(f'prediction: {classes[label] if classes else label}', fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    fig.savefig(args.out, dpi=100)
    plt.close(fig)
    print(f'wrote {args.out} ({len(result.kept_indices)} pruning stages)')
    return result


if __name__ == '__main__':
    main()
