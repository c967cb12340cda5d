"""Tiny datasets and configs the tests generate for themselves (nothing is downloaded)."""
import atexit
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
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


def load_tool(path: str):
    """A repo script (path relative to the repo) as a module, its folder importable as when it runs."""
    import importlib.util
    script = REPO / path
    if str(script.parent) not in sys.path:
        sys.path.insert(0, str(script.parent))
    spec = importlib.util.spec_from_file_location(script.stem.lstrip('_') + '_tool', script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class ToolServer:
    """The client side of tests/tool_server.py: one server per test process, started on first use."""

    def __init__(self):
        self.process = None

    def start(self):
        env = dict(os.environ, PYTHONPATH=str(REPO))
        self.process = subprocess.Popen([sys.executable, str(REPO / 'tests' / 'tool_server.py')], cwd=REPO, env=env,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        atexit.register(self.stop)
        self.reply('ready')

    def stop(self):
        if self.process is not None and self.process.poll() is None:
            self.process.stdin.close()
            self.process.wait(timeout=30)

    def reply(self, key):
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f'the tool server ended (status {self.process.wait()}) before answering {key!r}')
        return json.loads(line)[key]

    def run(self, script, args, env, timeout):
        """Run ``script`` with ``args``; returns (returncode, stdout, stderr)."""
        if self.process is None or self.process.poll() is not None:
            self.start()
        with tempfile.TemporaryDirectory() as logs:
            out, err = Path(logs) / 'stdout', Path(logs) / 'stderr'
            request = dict(script=str(REPO / script), args=list(args), cwd=str(REPO), env=env, stdout=str(out),
                           stderr=str(err))
            self.process.stdin.write(json.dumps(request) + '\n')
            self.process.stdin.flush()
            pid, timed_out = self.reply('pid'), threading.Event()

            def kill():
                timed_out.set()
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)

            timer = threading.Timer(timeout, kill)
            timer.start()
            try:
                returncode = self.reply('returncode')
            finally:
                timer.cancel()
            stdout, stderr = out.read_text(errors='replace'), err.read_text(errors='replace')
        if timed_out.is_set():
            raise subprocess.TimeoutExpired([script, *args], timeout, stdout, stderr)
        return returncode, stdout, stderr


TOOL_SERVER = ToolServer()


USED_PORTS = set()


def free_port() -> int:
    """A free local TCP port, never the same one twice in a worker (two torchruns may be starting at once)."""
    while True:
        with socket.socket() as sock:
            sock.bind(('127.0.0.1', 0))
            port = sock.getsockname()[1]
        if port not in USED_PORTS:
            USED_PORTS.add(port)
            return port


def torchrun(nproc: int = 2) -> list:
    """``run_tool`` / interpreter arguments that start a script under torchrun, on a fresh port."""
    return ['-m', 'torch.distributed.run', f'--nproc_per_node={nproc}', f'--master_port={free_port()}']


FAILURE_LINE = re.compile(r'Error\b|Exception\b|terminate called|Fatal Python error|Signal \d+ \(')


def failure_lines(text: str, limit: int = 20) -> str:
    """The lines that say why a run failed, wherever they are: torchrun's own traceback fills the tail, and a rank's
    last words ("terminate called ...") sit far above it."""
    lines = [line for line in text.splitlines() if FAILURE_LINE.search(line) and 'Warning' not in line]
    return '\n'.join(lines[:limit])


def run_tool(*args, timeout=900, env=None, fresh=False, check=True):
    """Run a repo script as this interpreter would; return the completed process.

    A script runs in a child forked from tests/tool_server.py (the frameworks already imported, ``sparsevit_mm``
    not); ``fresh=True`` or a module run (``'-m', 'torch.distributed.run', ...``) starts a new interpreter.
    ``check``: raise with the output unless the run succeeded; ``check=False``: unless it failed.
    """
    full_env = {**os.environ, 'PYTHONPATH': str(REPO), **(env or {})}  # env may extend PYTHONPATH
    args = [str(arg) for arg in args]
    if fresh or args[0] == '-m':
        proc = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                              env=full_env)
    else:
        returncode, stdout, stderr = TOOL_SERVER.run(args[0], args[1:], full_env, timeout)
        proc = subprocess.CompletedProcess([sys.executable, *args], returncode, stdout, stderr)
    if check and proc.returncode != 0:
        raise AssertionError(f'{args} failed ({proc.returncode}); lines naming the failure:\n'
                             f'{failure_lines(proc.stdout + proc.stderr)}\n--- output tails ---\n'
                             f'{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}')
    if not check and proc.returncode == 0:
        raise AssertionError(f'{args} succeeded, a failure was expected:\n{proc.stdout[-3000:]}')
    return proc


def run_tool_peak_memory(*args, timeout=900, env=None):
    """Run a repo script in a fresh interpreter; return (completed process, its peak resident memory in MiB)."""
    full_env = {**os.environ, 'PYTHONPATH': str(REPO), **(env or {})}
    with tempfile.TemporaryFile('w+') as out, tempfile.TemporaryFile('w+') as err:
        process = subprocess.Popen([sys.executable, *map(str, args)], cwd=REPO, env=full_env, stdout=out, stderr=err,
                                   text=True)
        timer = threading.Timer(timeout, process.kill)
        timer.start()
        try:
            _, status, usage = os.wait4(process.pid, 0)  # the rusage of this child alone
        finally:
            timer.cancel()
        process.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        proc = subprocess.CompletedProcess(process.args, process.returncode, out.read(), err.read())
    if proc.returncode != 0:
        raise AssertionError(f'{args} failed ({proc.returncode}); lines naming the failure:\n'
                             f'{failure_lines(proc.stdout + proc.stderr)}\n--- output tails ---\n'
                             f'{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}')
    return proc, usage.ru_maxrss / 1024  # Linux reports KiB


def make_coco(root, num_images: int = 6, size=(96, 128), seed: int = 0):
    """A tiny COCO-format instance set: coloured rectangles ('box') and ellipses ('blob') with polygons.

    Writes ``root/images/*.png`` and ``root/annotations.json``; returns ``root``.
    """
    import json
    rng = np.random.default_rng(seed)
    root = Path(root)
    (root / 'images').mkdir(parents=True, exist_ok=True)
    height, width = size
    images, annotations = [], []
    for image_id in range(1, num_images + 1):
        canvas = rng.integers(0, 60, size=(height, width, 3), dtype=np.uint8)
        for _ in range(int(rng.integers(1, 4))):
            category = int(rng.integers(1, 3))
            w, h = int(rng.integers(16, 40)), int(rng.integers(16, 40))
            x, y = int(rng.integers(0, width - w)), int(rng.integers(0, height - h))
            if category == 1:
                canvas[y:y + h, x:x + w] = (230, 60, 60)
                polygon = [x, y, x + w, y, x + w, y + h, x, y + h]
                area = w * h
            else:
                t = np.linspace(0, 2 * np.pi, 16, endpoint=False)
                px, py = x + w / 2 + w / 2 * np.cos(t), y + h / 2 + h / 2 * np.sin(t)
                yy, xx = np.mgrid[:height, :width]
                inside = ((xx - x - w / 2) / (w / 2)) ** 2 + ((yy - y - h / 2) / (h / 2)) ** 2 <= 1
                canvas[inside] = (60, 200, 90)
                polygon = np.stack([px, py], 1).round(1).flatten().tolist()
                area = float(inside.sum())
            annotations.append(dict(id=len(annotations) + 1, image_id=image_id, category_id=category, iscrowd=0,
                                    bbox=[x, y, w, h], area=area, segmentation=[polygon]))
        name = f'{image_id:04d}.png'
        Image.fromarray(canvas).save(root / 'images' / name)
        images.append(dict(id=image_id, file_name=name, height=height, width=width))
    categories = [dict(id=1, name='box'), dict(id=2, name='blob')]
    (root / 'annotations.json').write_text(json.dumps(dict(images=images, annotations=annotations,
                                                           categories=categories)))
    return root


def make_ade(root, num_images: int = 6, size: int = 64, seed: int = 0):
    """A tiny ADE20K-style set: ``images/training/*.jpg`` and ``annotations/training/*.png`` (0 = ignore).

    Labels 1 and 2 are a bright square and a dark square on a mid-grey background labelled 3.
    """
    rng = np.random.default_rng(seed)
    root = Path(root)
    for split in ('training', 'validation'):
        (root / 'images' / split).mkdir(parents=True, exist_ok=True)
        (root / 'annotations' / split).mkdir(parents=True, exist_ok=True)
        for n in range(num_images):
            image = np.full((size, size, 3), 128, np.uint8) + rng.integers(0, 20, (size, size, 3), dtype=np.uint8)
            label = np.full((size, size), 3, np.uint8)
            for value, colour in ((1, 240), (2, 20)):
                s = int(rng.integers(12, 28))
                y, x = rng.integers(0, size - s, size=2)
                image[y:y + s, x:x + s] = colour
                label[y:y + s, x:x + s] = value
            label[:2] = 0  # a border the loss ignores
            Image.fromarray(image).save(root / 'images' / split / f'{n:04d}.jpg', quality=95)
            Image.fromarray(label).save(root / 'annotations' / split / f'{n:04d}.png')
    return root


TINY_SWIN = dict(embed_dims=32, depths=[1, 1, 2, 1], num_heads=[1, 2, 4, 8])
TINY_CONVNEXT = dict(depths=[1, 1, 2, 1], channels=[32, 64, 128, 256])


def tiny_backbone(kind: str, **kwargs) -> dict:
    """A small DynamicSwinTransformer / DynamicConvNeXt config (32 / 64 / 128 / 256 channels, one pruning stage)."""
    if kind == 'swin':
        return dict(type='DynamicSwinTransformer', arch=TINY_SWIN, prune_layers=[1], keep_ratio=0.7,
                    drop_path_rate=0.0, **kwargs)
    return dict(type='DynamicConvNeXt', arch=TINY_CONVNEXT, prune_layers=[1], keep_ratio=0.7,
                out_indices=(0, 1, 2, 3), gap_before_final_norm=False, **kwargs)


def detection_config(kind, data_root, work_dir, max_iters=4):
    """mmdet's own Mask R-CNN Swin-T 1x config with the backbone swapped and a tiny data set (as config text)."""
    return f"""
_base_ = ['mmdet::swin/mask-rcnn_swin-t-p4-w7_fpn_1x_coco.py']
model = dict(
    backbone=dict(_delete_=True, **{tiny_backbone(kind)!r}),
    neck=dict(in_channels=[32, 64, 128, 256]),
    roi_head=dict(bbox_head=dict(num_classes=2), mask_head=dict(num_classes=2)))
""" + tiny_coco_data(data_root, work_dir, max_iters)


def tiny_coco_data(data_root, work_dir, max_iters=4, scale=(128, 96), validate=True) -> str:
    """The data, evaluator and short schedule part of an mmdet config on :func:`make_coco` data (config text).

    ``scale``: the Resize scale (W, H) of both pipelines. ``validate=False``: training only (no validation at the
    end, no checkpoint saved).
    """
    if not validate:
        return tiny_coco_data(data_root, work_dir, max_iters, scale) + """
val_cfg = None
val_dataloader = None
val_evaluator = None
default_hooks = dict(logger=dict(type='LoggerHook', interval=1), checkpoint=None)
"""
    return f"""
metainfo = dict(classes=('box', 'blob'))
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='Resize', scale={tuple(scale)!r}, keep_ratio=True),
    dict(type='PackDetInputs')]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale={tuple(scale)!r}, keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='PackDetInputs', meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor'))]
dataset = dict(type='CocoDataset', data_root={str(data_root)!r}, ann_file='annotations.json', metainfo=metainfo,
               data_prefix=dict(img='images/'))
train_dataloader = dict(batch_size=2, num_workers=0, persistent_workers=False,
                        sampler=dict(type='InfiniteSampler', shuffle=True), batch_sampler=None,
                        dataset=dict(dataset, pipeline=train_pipeline, filter_cfg=dict(filter_empty_gt=True)))
val_dataloader = dict(batch_size=1, num_workers=0, persistent_workers=False,
                      dataset=dict(dataset, pipeline=test_pipeline, test_mode=True))
test_dataloader = val_dataloader
val_evaluator = dict(type='CocoMetric', ann_file={str(Path(data_root) / 'annotations.json')!r},
                     metric=['bbox', 'segm'])
test_evaluator = val_evaluator
train_cfg = dict(_delete_=True, type='IterBasedTrainLoop', max_iters={max_iters}, val_interval={max_iters})
param_scheduler = [dict(type='ConstantLR', factor=1.0, by_epoch=False)]
default_hooks = dict(logger=dict(type='LoggerHook', interval=1),
                     checkpoint=dict(type='CheckpointHook', interval={max_iters}, by_epoch=False))
log_processor = dict(by_epoch=False)
work_dir = {str(work_dir)!r}
"""


def tiny_segmentation_schedule(work_dir, max_iters=4) -> str:
    """The test loader, short schedule, hooks and work dir of an mmseg config on :func:`make_ade` data (text)."""
    return f"""
test_dataloader = val_dataloader
train_cfg = dict(type='IterBasedTrainLoop', max_iters={max_iters}, val_interval={max_iters})
param_scheduler = [dict(type='ConstantLR', factor=1.0, by_epoch=False)]
default_hooks = dict(logger=dict(type='LoggerHook', interval=1, log_metric_by_epoch=False),
                     checkpoint=dict(type='CheckpointHook', interval={max_iters}, by_epoch=False))
work_dir = {str(work_dir)!r}
"""


def segmentation_config(kind, data_root, work_dir, max_iters=4):
    """mmseg's own UperNet Swin-T 160k config with the backbone swapped and a tiny ADE-style set (config text)."""
    return f"""
_base_ = ['mmseg::swin/swin-tiny-patch4-window7-in1k-pre_upernet_8xb2-160k_ade20k-512x512.py']
crop_size = (64, 64)
model = dict(
    data_preprocessor=dict(size=crop_size),
    backbone=dict(_delete_=True, **{tiny_backbone(kind)!r}),
    decode_head=dict(in_channels=[32, 64, 128, 256], channels=32, num_classes=3),
    auxiliary_head=dict(in_channels=128, channels=32, num_classes=3))
metainfo = dict(classes=('bright', 'dark', 'background'), palette=[[255, 255, 255], [0, 0, 0], [128, 128, 128]])
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='PackSegInputs')]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='PackSegInputs')]
train_dataloader = dict(batch_size=2, num_workers=0, persistent_workers=False,
    dataset=dict(type='BaseSegDataset', img_suffix='.jpg', seg_map_suffix='.png', reduce_zero_label=True,
                 data_root={str(data_root)!r}, metainfo=metainfo, pipeline=train_pipeline,
                 data_prefix=dict(img_path='images/training', seg_map_path='annotations/training')))
val_dataloader = dict(batch_size=1, num_workers=0, persistent_workers=False,
    dataset=dict(type='BaseSegDataset', img_suffix='.jpg', seg_map_suffix='.png', reduce_zero_label=True,
                 data_root={str(data_root)!r}, metainfo=metainfo, pipeline=test_pipeline,
                 data_prefix=dict(img_path='images/validation', seg_map_path='annotations/validation')))
""" + tiny_segmentation_schedule(work_dir, max_iters)


TINY_DVT = dict(embed_dims=32, depth=2, num_heads=2, mlp_ratio=2.0, qkv_bias=True, tokenizer='patch')


def dvt_config(data_root, work_dir, max_iters=4, extra=''):
    """A DVT config (tiny exits) on a :func:`make_imagenet_folder` set, images resized to 224."""
    return f"""
_base_ = ['mmpretrain::_base_/default_runtime.py']
custom_imports = dict(imports=['sparsevit_mm'], allow_failed_imports=False)
model = dict(type='DVT', arch={TINY_DVT!r}, num_classes=2, drop_path_rate=0.0,
             data_preprocessor=dict(num_classes=2, mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375],
                                    to_rgb=True){extra})
train_pipeline = [dict(type='LoadImageFromFile'), dict(type='RandomResizedCrop', scale=224),
                  dict(type='RandomFlip', prob=0.5), dict(type='PackInputs')]
test_pipeline = [dict(type='LoadImageFromFile'), dict(type='Resize', scale=224), dict(type='PackInputs')]
train_dataloader = dict(batch_size=4, num_workers=0,
    dataset=dict(type='CustomDataset', data_root={str(data_root)!r}, data_prefix='train', pipeline=train_pipeline),
    sampler=dict(type='InfiniteSampler', shuffle=True))
val_dataloader = dict(batch_size=4, num_workers=0,
    dataset=dict(type='CustomDataset', data_root={str(data_root)!r}, data_prefix='val', pipeline=test_pipeline),
    sampler=dict(type='DefaultSampler', shuffle=False))
val_evaluator = [dict(type='Accuracy', topk=(1,)), dict(type='EarlyExitMetric')]
test_dataloader = val_dataloader
test_evaluator = val_evaluator
optim_wrapper = dict(optimizer=dict(type='AdamW', lr=1e-3, weight_decay=0.05))
param_scheduler = [dict(type='ConstantLR', factor=1.0, by_epoch=False)]
train_cfg = dict(type='IterBasedTrainLoop', max_iters={max_iters}, val_interval={max_iters})
val_cfg = dict()
test_cfg = dict()
default_hooks = dict(logger=dict(type='LoggerHook', interval=1),
                     checkpoint=dict(type='CheckpointHook', interval={max_iters}, by_epoch=False))
log_processor = dict(by_epoch=False)
randomness = dict(seed=0)
work_dir = {str(work_dir)!r}
"""


TINY_UVIT = dict(embed_dims=64, depth=4, num_heads=4)


def tiny_family(family: str):
    """A small eval-mode model of each family and its inputs: 'dynamicvit' (at a size other than its built one, so
    the resampled position embedding is in the graph), 'swin', 'convnext' (keep 0.7), 'uvit', 'dvt' (224 px)."""
    from sparsevit_mm.models import DVT, DynamicConvNeXt, DynamicSwinTransformer, DynamicViT, UViT
    if family == 'dynamicvit':
        model = DynamicViT(arch=TINY_ARCH, img_size=32, patch_size=8, keep_ratio=0.7, prune_layers=[1, 2, 3])
        return model.eval(), (torch.randn(2, 3, 48, 64), )
    if family == 'swin':
        model = DynamicSwinTransformer(arch=TINY_SWIN, prune_layers=[1], keep_ratio=0.7, drop_path_rate=0.0)
        return model.eval(), (torch.randn(2, 3, 64, 96), )
    if family == 'convnext':
        model = DynamicConvNeXt(arch=TINY_CONVNEXT, prune_layers=[1], keep_ratio=0.7, out_indices=(0, 1, 2, 3),
                                gap_before_final_norm=False)
        return model.eval(), (torch.randn(2, 3, 64, 96), )
    if family == 'uvit':
        model = UViT(arch=TINY_UVIT, img_size=16, patch_size=4, in_channels=3, num_classes=5)
        return model.eval(), (torch.randn(2, 3, 16, 16), torch.rand(2) * 999, torch.tensor([1, 4]))
    if family == 'dvt':
        model = DVT(arch=TINY_DVT, num_classes=5)
        model.init_weights()
        return model.eval(), (torch.randn(2, 3, 224, 224), )
    raise ValueError(f'unknown family {family!r}')


def uvit_config(data_root, work_dir, max_iters=200, num_classes=0, extra_model=''):
    """A tiny pixel-space U-ViT diffusion config on a :func:`make_imagenet_folder` set (32x32 images)."""
    return f"""
_base_ = ['{(REPO / 'configs' / '_base_' / 'uvit_runtime.py').as_posix()}']
model = dict(
    type='UViTDiffusion',
    network=dict(type='UViT', arch={TINY_UVIT!r}, img_size=32, patch_size=4, in_channels=3,
                 num_classes={num_classes}),
    schedule='continuous', sampler=dict(steps=10, order=2){extra_model})
train_dataloader = dict(batch_size=16, num_workers=0, persistent_workers=False,
    sampler=dict(type='InfiniteSampler', shuffle=True),
    dataset=dict(type='CustomDataset', data_root={str(data_root)!r}, data_prefix='train',
                 pipeline=[dict(type='LoadImageFromFile'), dict(type='RandomFlip', prob=0.5),
                           dict(type='PackInputs')]))
optim_wrapper = dict(optimizer=dict(lr=2e-3, betas=(0.9, 0.99), weight_decay=0.0))
param_scheduler = [dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0, end=20),
                   dict(type='ConstantLR', factor=1.0, by_epoch=False, begin=20)]
train_cfg = dict(max_iters={max_iters})
custom_hooks = [dict(type='EMAHook', momentum=0.05, update_buffers=False, priority='ABOVE_NORMAL')]
default_hooks = dict(logger=dict(type='LoggerHook', interval=10),
                     checkpoint=dict(type='CheckpointHook', interval={max_iters // 2}, by_epoch=False))
randomness = dict(seed=0)
work_dir = {str(work_dir)!r}
"""


def vit_detection_config(data_root, work_dir, max_iters=4, keep_ratio=0.7):
    """mmdet's Mask R-CNN R-50 1x config with a tiny DynamicViT + SimpleFeaturePyramid on :func:`make_coco` data.

    The config text mirrors configs/dynamicvit/mask-rcnn_dynamicvit-deit-small-r0.7_simple-fpn_1x_coco.py with a
    64-channel, 4-block ViT (patch 16, one stride-16 map) and 96x128 images padded to multiples of 32.
    """
    return f"""
_base_ = ['mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py']
custom_imports = dict(imports=['sparsevit_mm'], allow_failed_imports=False)
model = dict(
    data_preprocessor=dict(pad_size_divisor=32),
    backbone=dict(_delete_=True, type='DynamicViT', arch={TINY_ARCH!r}, img_size=64, patch_size=16,
                  keep_ratio={keep_ratio}, prune_layers=[1, 2, 3], out_type='featmap', out_indices=(3,)),
    neck=dict(_delete_=True, type='SimpleFeaturePyramid', in_channels=64, out_channels=256, num_outs=5),
    roi_head=dict(bbox_head=dict(num_classes=2), mask_head=dict(num_classes=2)),
    # a detector trained 4 iterations scores below mmdet's 0.05: keep boxes (20 per image, not mmdet's 100, so
    # that mask pasting and the segm metric stay quick) so that the metric has results
    test_cfg=dict(rcnn=dict(score_thr=0.0, max_per_img=20)))
randomness = dict(seed=0)
optim_wrapper = dict(
    optimizer=dict(_delete_=True, type='AdamW', lr=1e-4, weight_decay=0.1),
    paramwise_cfg=dict(custom_keys={{'pos_embed': dict(decay_mult=0.0), 'cls_token': dict(decay_mult=0.0)}}))
""" + tiny_coco_data(data_root, work_dir, max_iters)


def vit_segmentation_config(kind, data_root, work_dir, max_iters=4, keep_ratio=0.7):
    """mmseg's DeiT-S UperNet (``kind='upernet'``) or Segmenter-S (``'segmenter'``) 160k ADE20K config with a tiny
    DynamicViT (64 channels, 4 blocks, patch 16) on :func:`make_ade` data (config text).

    Mirrors configs/dynamicvit/{upernet,segmenter}_dynamicvit-deit-small-r0.7_*.py: UperNet takes every block's
    map through mmseg's MultiLevelNeck, Segmenter the last block's (final norm on).
    """
    common = dict(type='DynamicViT', arch=TINY_ARCH, img_size=64, patch_size=16, keep_ratio=keep_ratio,
                  prune_layers=[1, 2, 3], out_type='featmap')
    if kind == 'upernet':
        base = 'mmseg::vit/vit_deit-s16_mln_upernet_8xb2-160k_ade20k-512x512.py'
        heads = f"""
    backbone=dict(_delete_=True, **{dict(common, out_indices=(0, 1, 2, 3), final_norm=False)!r}),
    neck=dict(type='MultiLevelNeck', in_channels=[64, 64, 64, 64], out_channels=64, scales=[4, 2, 1, 0.5]),
    decode_head=dict(in_channels=[64, 64, 64, 64], channels=32, num_classes=3),
    auxiliary_head=dict(in_channels=64, channels=32, num_classes=3))"""
    elif kind == 'segmenter':
        base = 'mmseg::segmenter/segmenter_vit-s_mask_8xb1-160k_ade20k-512x512.py'
        heads = f"""
    backbone=dict(_delete_=True, **{dict(common, out_indices=-1, final_norm=True)!r}),
    decode_head=dict(in_channels=64, channels=64, embed_dims=64, num_heads=4, num_layers=1, num_classes=3))"""
    else:
        raise ValueError(f"kind must be 'upernet' or 'segmenter', got {kind!r}")
    return f"""
_base_ = [{base!r}]
custom_imports = dict(imports=['sparsevit_mm'], allow_failed_imports=False)
crop_size = (64, 64)
model = dict(
    data_preprocessor=dict(size=crop_size, test_cfg=dict(size_divisor=16)),
    pretrained=None,{heads}
metainfo = dict(classes=('bright', 'dark', 'background'), palette=[[255, 255, 255], [0, 0, 0], [128, 128, 128]])
pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='PackSegInputs')]
dataset = dict(type='BaseSegDataset', img_suffix='.jpg', seg_map_suffix='.png', reduce_zero_label=True,
               data_root={str(data_root)!r}, metainfo=metainfo, pipeline=pipeline)
train_dataloader = dict(batch_size=2, num_workers=0, persistent_workers=False,
    dataset=dict(dataset, data_prefix=dict(img_path='images/training', seg_map_path='annotations/training')))
val_dataloader = dict(batch_size=1, num_workers=0, persistent_workers=False,
    dataset=dict(dataset, data_prefix=dict(img_path='images/validation', seg_map_path='annotations/validation')))
""" + tiny_segmentation_schedule(work_dir, max_iters)
