"""Tiny datasets and configs the tests generate for themselves (nothing is downloaded)."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
COLORS = [(220, 40, 40), (40, 200, 60), (50, 80, 230), (230, 210, 40)]


def object_image(rng: np.random.Generator, label: int, size: int = 32, patch: int = 8):
    """A noisy grey background with one patch-aligned coloured square whose colour is the label.

    Returns the HWC uint8 image and the flat index of the patch holding the object.
    """
    image = rng.integers(90, 130, size=(size, size, 3), dtype=np.uint8)
    grid = size // patch
    row, col = rng.integers(0, grid, size=2)
    image[row * patch:(row + 1) * patch, col * patch:(col + 1) * patch] = COLORS[label]
    return image, int(row * grid + col)


def make_imagenet_folder(root, num_classes: int = 2, per_class: int = 8, size: int = 32, seed: int = 0,
                         splits=('train', 'val')):
    """ImageNet-style folders ``root/<split>/<class>/<n>.png`` of :func:`object_image` samples."""
    rng = np.random.default_rng(seed)
    for split in splits:
        for label in range(num_classes):
            folder = Path(root) / split / f'class_{label}'
            folder.mkdir(parents=True, exist_ok=True)
            for n in range(per_class):
                Image.fromarray(object_image(rng, label, size)[0]).save(folder / f'{n}.png')
    return Path(root)


TINY_ARCH = dict(embed_dims=64, num_layers=4, num_heads=4, mlp_ratio=2.0)


def tiny_classifier_config(data_root, work_dir, teacher_checkpoint=None, max_iters=4, num_classes=2,
                           keep_ratio=0.7, batch_size=4):
    """A complete mmpretrain config (as text) training a tiny DynamicViT on :func:`make_imagenet_folder` data."""
    teacher = ''
    if teacher_checkpoint is not None:
        teacher = f"""
    teacher=dict(
        model=dict(
            type='ImageClassifier',
            backbone=dict(type='DynamicViT', arch={TINY_ARCH!r}, img_size=32, patch_size=8, keep_ratio=1.0,
                          prune_layers=[1, 2, 3]),
            head=dict(type='VisionTransformerClsHead', num_classes={num_classes}, in_channels=64)),
        checkpoint={str(teacher_checkpoint)!r}),"""
    return f"""
_base_ = ['mmpretrain::_base_/default_runtime.py']
custom_imports = dict(imports=['sparsevit_mm'], allow_failed_imports=False)
model = dict(
    type='DynamicViTClassifier',
    data_preprocessor=dict(num_classes={num_classes}, mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375],
                           to_rgb=True),
    backbone=dict(type='DynamicViT', arch={TINY_ARCH!r}, img_size=32, patch_size=8, keep_ratio={keep_ratio},
                  prune_layers=[1, 2, 3]),
    head=dict(type='VisionTransformerClsHead', num_classes={num_classes}, in_channels=64),{teacher}
)
pipeline = [dict(type='LoadImageFromFile'), dict(type='PackInputs')]
train_dataloader = dict(batch_size={batch_size}, num_workers=0,
    dataset=dict(type='CustomDataset', data_root={str(data_root)!r}, data_prefix='train', pipeline=pipeline),
    sampler=dict(type='InfiniteSampler', shuffle=True))
val_dataloader = dict(batch_size={batch_size}, num_workers=0,
    dataset=dict(type='CustomDataset', data_root={str(data_root)!r}, data_prefix='val', pipeline=pipeline),
    sampler=dict(type='DefaultSampler', shuffle=False))
val_evaluator = dict(type='Accuracy', topk=(1,))
test_dataloader = val_dataloader
test_evaluator = val_evaluator
optim_wrapper = dict(optimizer=dict(type='AdamW', lr=1e-3, weight_decay=0.05))
param_scheduler = [dict(type='ConstantLR', factor=1.0, by_epoch=False)]
train_cfg = dict(type='IterBasedTrainLoop', max_iters={max_iters}, val_interval={max_iters})
val_cfg = dict()
test_cfg = dict()
default_hooks = dict(logger=dict(type='LoggerHook', interval=1),
                     checkpoint=dict(type='CheckpointHook', interval=2, by_epoch=False))
log_processor = dict(by_epoch=False)
randomness = dict(seed=0)
work_dir = {str(work_dir)!r}
"""


def save_tiny_teacher(path, num_classes=2, seed=0):
    """A random-init dense tiny classifier checkpoint in our layout (what a converted DeiT would look like)."""
    from mmpretrain.models import ImageClassifier, VisionTransformerClsHead  # noqa: F401
    from sparsevit_mm.models import DynamicViT
    torch.manual_seed(seed)
    backbone = DynamicViT(arch=TINY_ARCH, img_size=32, patch_size=8, keep_ratio=1.0, prune_layers=[1, 2, 3])
    backbone.init_weights()
    head = torch.nn.Linear(64, num_classes)
    state = {f'backbone.{k}': v for k, v in backbone.state_dict().items()}
    state['head.layers.head.weight'] = head.weight.detach()
    state['head.layers.head.bias'] = head.bias.detach()
    torch.save({'state_dict': state, 'meta': {}}, path)
    return path


def run_tool(*args, timeout=900, env=None):
    """Run a repo script with this interpreter; return the completed process (raises with its output on error)."""
    full_env = dict(os.environ, PYTHONPATH=str(REPO), **(env or {}))
    proc = subprocess.run([sys.executable, *map(str, args)], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=full_env)
    if proc.returncode != 0:
        raise AssertionError(f'{args} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}')
    return proc
