#!/usr/bin/env python
"""Show where a sparse backbone spends its compute: the image, then one panel per pruning stage.

    python tools/visualize_tokens.py demo.jpg CONFIG CHECKPOINT --out tokens.png [--keep-ratio 0.7]

DynamicViT: the tokens kept at each stage (dropped patches greyed). DynamicSwinTransformer / DynamicConvNeXt: the
positions each score predictor sends through the slow path (the rest take the fast path). Classification configs
show the image as evaluated (DeiT's resize and centre crop) and the predicted class; detection and segmentation
configs the image at the config's test size and the classes found.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import tools._quiet  # noqa: E402,F401  (before the frameworks: their deprecation warnings)
from sparsevit_mm.launch import one_line_errors  # noqa: E402
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), 'analysis'))  # the test-size helpers

import numpy as np  # noqa: E402
import torch  # noqa: E402
from mmengine.config import DictAction  # noqa: E402
from PIL import Image  # noqa: E402

from _benchmarking import dense_prediction_framework, test_size, test_step_data  # noqa: E402

from sparsevit_mm.apis import init_model  # noqa: E402
from sparsevit_mm.models.backbones.base import SparseBackbone  # noqa: E402
from sparsevit_mm.utils.checkpoint import load_checkpoint_file  # noqa: E402


def load_classification_image(path: str, size: int) -> np.ndarray:
    """Resize the short side to size/0.875 (bicubic) and centre-crop size x size, as DeiT's evaluation does."""
    image = Image.open(path).convert('RGB')
    scale = size / 0.875 / min(image.size)
    image = image.resize((max(size, round(image.width * scale)), max(size, round(image.height * scale))),
                         Image.BICUBIC)
    left, top = (image.width - size) // 2, (image.height - size) // 2
    return np.asarray(image.crop((left, top, left + size, top + size)))


def load_dense_image(path: str, height: int, width: int, divisor: int = 32) -> np.ndarray:
    """Fit the image into the test size (aspect kept, as mmdet's / mmseg's Resize(keep_ratio=True)), sides rounded
    down to multiples of ``divisor`` (the patch / total stride)."""
    image = Image.open(path).convert('RGB')
    short, long = min(height, width), max(height, width)
    scale = min(short / min(image.size), long / max(image.size))
    new_w = max(divisor, int(image.width * scale) // divisor * divisor)
    new_h = max(divisor, int(image.height * scale) // divisor * divisor)
    return np.asarray(image.resize((new_w, new_h), Image.BILINEAR))


def grey_out(image: np.ndarray, kept: np.ndarray, grid, strength: float = 0.75) -> np.ndarray:
    """Blend every cell of the (rows, cols) ``grid`` over the image that is not in ``kept`` (flat indices) to white."""
    rows, cols = grid
    cell_h, cell_w = image.shape[0] / rows, image.shape[1] / cols
    mask = np.ones((rows, cols), dtype=bool)
    mask.flat[np.asarray(kept, dtype=np.int64)] = False
    row_index = (np.arange(image.shape[0]) / cell_h).astype(int)
    col_index = (np.arange(image.shape[1]) / cell_w).astype(int)
    pixels = mask[row_index][:, col_index]
    out = image.astype(np.float32)
    out[pixels] = out[pixels] * (1 - strength) + 255 * strength
    return out.astype(np.uint8)


def class_names(model, cfg, checkpoint: str):
    """The class names: from the checkpoint's dataset meta, the config's dataset, or the dataset class."""
    meta = load_checkpoint_file(checkpoint).get('meta', {}) if checkpoint else {}
    classes = (meta.get('dataset_meta') or {}).get('classes') or (getattr(model, 'dataset_meta', None) or {}).get(
        'classes')
    if classes:
        return list(classes)
    dataset = (cfg.get('test_dataloader') or {}).get('dataset') or {}
    classes = (dataset.get('metainfo') or {}).get('classes')
    if classes:
        return list(classes)
    try:  # the dataset class's own names (ImageNet, COCO, ADE20K), or a folder dataset's folders
        from mmengine.registry import DATASETS
        built = DATASETS.build(dataset)
        return list(built.metainfo.get('classes') or []) or None
    except Exception:  # no data on this machine: indices it is
        cls = DATASETS.get(str(dataset.get('type', '')))
        return list(getattr(cls, 'METAINFO', {}).get('classes') or []) or None


def name(classes, index: int) -> str:
    return classes[index] if classes and 0 <= index < len(classes) else str(index)


def main(argv=None):
    parser = argparse.ArgumentParser(description='Visualise the tokens / positions each pruning stage keeps')
    parser.add_argument('image', help='an image file')
    parser.add_argument('config', help='config of a model with a sparse backbone')
    parser.add_argument('checkpoint', help='its trained weights')
    parser.add_argument('--out', default='tokens.png', help='the figure to write')
    parser.add_argument('--keep-ratio', type=float, default=None, help='override the config\'s keep ratio')
    parser.add_argument('--score-threshold', type=float, default=0.3, help='detections shown in the title')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override config entries, e.g. model.backbone.keep_ratio=0.5')
    args = parser.parse_args(argv)

    model = init_model(args.config, args.checkpoint, cfg_options=args.cfg_options)
    backbone = getattr(model, 'backbone', None)
    if not isinstance(backbone, SparseBackbone):
        what = f'whose backbone {type(backbone).__name__} is not token-sparse' if backbone is not None \
            else 'which has no backbone'
        raise ValueError(f'{args.config} builds {type(model).__name__}, {what}: visualize_tokens.py shows the tokens '
                         'a token-sparse backbone (DynamicViT, DynamicSwinTransformer, DynamicConvNeXt) keeps (DVT: '
                         'tools/analysis/benchmark_early_exit.py shows its exits)')
    if args.keep_ratio is not None:
        backbone.keep_ratio = args.keep_ratio
    framework = dense_prediction_framework(model)
    classes = class_names(model, model.cfg, args.checkpoint)
    if framework is None:
        size = backbone.grid_size[0] * backbone.patch_size if hasattr(backbone, 'grid_size') else 224
        image = load_classification_image(args.image, size)
    else:
        image = load_dense_image(args.image, *test_size(model.cfg, framework))
    uint8 = torch.from_numpy(np.array(image)).permute(2, 0, 1)
    # RGB image; the data preprocessor expects the pipeline's BGR and converts it where the config says so
    data = dict(inputs=[uint8.flip(0)], data_samples=None)
    if framework is not None:
        data = test_step_data(framework, 1, *image.shape[:2])
        data['inputs'] = [uint8.flip(0)]
    with torch.no_grad():
        inputs = model.data_preprocessor(data, False)['inputs']
        result = backbone.forward_sparse(inputs)
        if framework is None:
            title = f'prediction: {name(classes, int(model(inputs, mode="tensor").argmax(1)))}'
        else:
            title = summary(model, framework, data, classes, args.score_threshold)
    routing = 'slow path' if backbone.keep_ratio_schedule == 'linear' else 'kept'
    grid = tuple(result.grid)
    panels = [('input', image)]
    for stage, kept in enumerate(result.kept_indices, start=1):
        panels.append((f'stage {stage}: {kept.shape[1]}/{grid[0] * grid[1]} {routing}',
                       grey_out(image, kept[0].cpu().numpy(), grid)))

    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    aspect = image.shape[1] / image.shape[0]
    fig, axes = plt.subplots(1, len(panels), figsize=(3 * aspect * len(panels), 3.3))
    for axis, (panel_title, panel) in zip(np.atleast_1d(axes), panels):
        axis.imshow(panel)
        axis.set_title(panel_title, fontsize=9)
        axis.axis('off')
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    fig.savefig(args.out, dpi=100)
    plt.close(fig)
    print(f'wrote {args.out} ({len(result.kept_indices)} pruning stages; {title})')
    return result


def summary(model, framework: str, data: dict, classes, threshold: float) -> str:
    """The classes a detector finds (score >= threshold) or a segmentor labels most, best first."""
    sample = model.test_step(data)[0]
    if framework == 'mmdet':
        instances = sample.pred_instances
        keep = instances.scores >= threshold
        labels = instances.labels[keep][instances.scores[keep].argsort(descending=True)].tolist()
        found = list(dict.fromkeys(name(classes, label) for label in labels))[:5]
        return f'detected (score >= {threshold}): {", ".join(found) if found else "nothing"}'
    labels, counts = sample.pred_sem_seg.data.flatten().unique(return_counts=True)
    order = counts.argsort(descending=True)[:5]
    return 'segmented (largest first): ' + ', '.join(name(classes, int(labels[i])) for i in order)


if __name__ == '__main__':
    with one_line_errors():  # a bad value or file: its message, no traceback
        main()
