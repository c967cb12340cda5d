#!/usr/bin/env python
"""Sample images from a U-ViT diffusion model: PNGs and a grid.

    python tools/sample.py CONFIG CHECKPOINT --num 64 --out samples/ [--label 207] [--guidance 0.4] [--steps 50]

The EMA weights of the checkpoint are used when it has them (mmengine's EMAHook saves them); ``--no-ema`` takes the
online weights. Official U-ViT checkpoints (plain state dicts) load directly.
"""
import argparse
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import tools._quiet  # noqa: E402,F401  (before the frameworks: their deprecation warnings)
from sparsevit_mm.launch import one_line_errors  # noqa: E402

import torch  # noqa: E402
from mmengine.config import DictAction  # noqa: E402
from torchvision.utils import save_image  # noqa: E402
from tqdm import tqdm  # noqa: E402

from sparsevit_mm.apis import init_model  # noqa: E402
from sparsevit_mm.utils.checkpoint import load_checkpoint_file, load_weights  # noqa: E402


def load_ema_weights(model, checkpoint_path: str) -> bool:
    """Load mmengine's EMA copy of the weights if the checkpoint has one; returns whether it did."""
    checkpoint = load_checkpoint_file(checkpoint_path)
    ema = checkpoint.get('ema_state_dict') if isinstance(checkpoint, dict) else None
    if not ema:
        return False
    state = {k[len('module.'):]: v for k, v in ema.items() if k.startswith('module.')}
    load_weights(model, state, source=f'{checkpoint_path} (EMA weights)')
    return True


def main(argv=None):
    parser = argparse.ArgumentParser(description='Sample images from a U-ViT diffusion model')
    parser.add_argument('config', help='a U-ViT diffusion config')
    parser.add_argument('checkpoint', help='its trained weights (ours or official U-ViT)')
    parser.add_argument('--num', type=int, default=16, help='number of images')
    parser.add_argument('--out', default='samples', help='output folder (PNGs and grid.png)')
    parser.add_argument('--label', type=int, default=None, help='class of every image (default: random classes)')
    parser.add_argument('--guidance', type=float, default=None, help='classifier-free guidance scale s')
    parser.add_argument('--steps', type=int, default=None, help='DPM-Solver steps (default: the config\'s, 50)')
    parser.add_argument('--order', type=int, default=None, choices=[1, 2, 3],
                        help='DPM-Solver order (default: the config\'s sampler)')
    parser.add_argument('--batch-size', type=int, default=16, help='samples generated at once (at least 1)')
    parser.add_argument('--seed', type=int, default=0, help='random seed of the initial noise (and labels)')
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu',
                        help='cuda or cpu (default: cuda when available)')
    parser.add_argument('--no-ema', action='store_true', help='use the online weights, not the EMA ones')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override config entries, e.g. model.backbone.keep_ratio=0.5')
    args = parser.parse_args(argv)
    for name in ('num', 'batch_size'):
        if getattr(args, name) < 1:
            raise ValueError(f'--{name.replace("_", "-")} must be at least 1, got {getattr(args, name)}')

    model = init_model(args.config, args.checkpoint, args.device, args.cfg_options)
    if not hasattr(model, 'sample'):
        raise ValueError(f'{type(model).__name__} is not a diffusion model')
    used_ema = False if args.no_ema else load_ema_weights(model, args.checkpoint)
    model.to(args.device).eval()
    os.makedirs(args.out, exist_ok=True)
    generator = torch.Generator().manual_seed(args.seed)
    images = []
    with tqdm(total=args.num, desc='sampling', unit='img') as bar:
        for start in range(0, args.num, args.batch_size):
            count = min(args.batch_size, args.num - start)
            batch = model.sample(count, labels=args.label, guidance=args.guidance, steps=args.steps,
                                 order=args.order, generator=generator).cpu()
            for i, image in enumerate(batch):
                save_image(image, os.path.join(args.out, f'{start + i:06d}.png'))
            images.append(batch)
            bar.update(count)
    grid = torch.cat(images)[:64]
    save_image(grid, os.path.join(args.out, 'grid.png'), nrow=int(math.ceil(math.sqrt(len(grid)))))
    print(f'wrote {args.num} images and grid.png to {args.out} ({"EMA" if used_ema else "online"} weights)')


if __name__ == '__main__':
    with one_line_errors():  # a bad value or file: its message, no traceback
        main()
