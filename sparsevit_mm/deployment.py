"""Export of our inference networks as ``torch.export`` programs and ONNX files, checked against eager PyTorch.

At inference DynamicViT, DynamicSwinTransformer and DynamicConvNeXt keep a fixed number of tokens for a given input
size and keep ratio (``num_kept`` of the positions, per stage), so every shape in their forward pass is static and
the whole network is one graph: ``torch.compile`` captures it without graph breaks, and ``torch.export`` / ONNX
write it out with the top-k selections and gathers inside. The kept counts are constants of that graph: another
keep ratio or input size means another export. The batch may stay dynamic.

What is exported (:func:`export_targets`):

- an mmpretrain classifier with one of our backbones: normalized images (B, 3, H, W) -> logits;
- a detector / segmentor with one of our backbones: the backbone, normalized images -> its feature maps (mmdet /
  mmseg's heads, with NMS and resizing, stay in their frameworks);
- U-ViT (``UViTDiffusion``): the noise-prediction network, (x_t, timesteps[, labels]) -> predicted noise;
- DVT: each exit as its own graph. Its early exit is data-dependent control flow (which samples go on depends on
  their confidence), so no single static graph holds it. Exit k's graph takes the images and what exit k - 1 hands
  on (final tokens, attention logits) and returns its logits and what exit k + 1 needs; the decision between the
  graphs runs in Python (:func:`~sparsevit_mm.models.classifiers.dvt.run_early_exit`, which ``DVT.early_exit``
  runs too), on any batch size.
"""
import inspect
import os
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .models.backbones.base import SparseBackbone
from .models.backbones.uvit import UViT, UViTBackbone
from .models.classifiers.dvt import DVT, DVTExitStep, run_early_exit  # noqa: F401  (run_early_exit: API)
from .models.diffusion import UViTDiffusion

FORMATS = {'torch-export': '.pt2', 'onnx': '.onnx'}
_ONNX_SINGLE_FILE_LIMIT = 1.8e9  # bytes of weights; protobuf files cannot exceed 2 GiB, larger ones get a .data file


class NotExportable(ValueError):
    """The model is not one :func:`export_targets` knows how to export (the message says what is)."""


@dataclass
class ExportTarget:
    """One graph to export: ``module(*inputs)`` returns a tensor or a tuple of tensors.

    ``inputs`` are example inputs at the export shape (their first dimension is the batch); ``input_names`` /
    ``output_names`` name them in the ONNX file.
    """
    name: str
    module: nn.Module
    inputs: Tuple[torch.Tensor, ...]
    input_names: Tuple[str, ...]
    output_names: Tuple[str, ...]


class ClassifierLogits(nn.Module):
    """An mmpretrain classifier's ``forward(images, mode='tensor')`` as a plain module: (B, 3, H, W) -> logits."""

    def __init__(self, classifier: nn.Module):
        super().__init__()
        self.classifier = classifier

    def forward(self, images: torch.Tensor):
        return self.classifier(images, mode='tensor')


def sparse_model_part(model: nn.Module) -> nn.Module:
    """The part of ``model`` that is ours: the model itself, or its backbone (refuses anything else)."""
    if isinstance(model, (SparseBackbone, UViT, UViTBackbone, UViTDiffusion, DVT)):
        return model
    backbone = getattr(model, 'backbone', None)
    if isinstance(backbone, (SparseBackbone, UViTBackbone)):
        return backbone
    raise NotExportable(
        f'{type(model).__name__} (backbone {type(backbone).__name__}) is not one of ours: the export tool writes '
        'DynamicViT, DynamicSwinTransformer, DynamicConvNeXt and U-ViT models (classifier, or the backbone of a '
        'detector / segmentor), U-ViT diffusion networks and DVT exits; export other OpenMMLab models with mmdeploy')


def default_shape(model: nn.Module) -> Optional[Tuple[int, int]]:
    """The input size a classifier or a bare model is built for (DynamicViT's ``img_size``, U-ViT's, DVT's 224),
    else None: a detector's or segmentor's backbone runs at the test size, which the caller must give."""
    part = sparse_model_part(model)
    if part is not model and not _is_mmpretrain(model):
        return None
    if isinstance(part, DVT):
        return 224, 224
    network = part.network if isinstance(part, UViTDiffusion) else part
    if isinstance(network, UViT):
        return network.img_size, network.img_size
    grid, patch = getattr(network, 'grid_size', None), getattr(network, 'patch_size', None)
    if grid is not None and isinstance(patch, int):
        return grid[0] * patch, grid[1] * patch
    return None


def example_images(batch: int, height: int, width: int, kind: str = 'noise', seed: int = 0,
                   channels: int = 3) -> torch.Tensor:
    """(B, C, H, W) float inputs as a data preprocessor gives them: ``'noise'`` (standard normal) or ``'image'``
    (smooth gradients and bright squares, normalized: score predictors see large uniform areas and edges)."""
    generator = torch.Generator().manual_seed(seed)
    if kind == 'noise':
        return torch.randn(batch, channels, height, width, generator=generator)
    if kind != 'image':
        raise ValueError(f"kind must be 'noise' or 'image', got {kind!r}")
    rows = torch.linspace(-1, 1, height).view(1, 1, height, 1)
    cols = torch.linspace(-1, 1, width).view(1, 1, 1, width)
    phase = torch.rand(batch, channels, 1, 1, generator=generator) * 6.28
    images = torch.sin(3 * rows + 2 * cols + phase) * 0.8
    for b in range(batch):
        for _ in range(4):
            side = int(torch.randint(max(2, min(height, width) // 8), max(3, min(height, width) // 3), (1, ),
                                     generator=generator))
            top = int(torch.randint(0, height - side + 1, (1, ), generator=generator))
            left = int(torch.randint(0, width - side + 1, (1, ), generator=generator))
            images[b, :, top:top + side, left:left + side] = 2.0 * torch.rand(channels, 1, 1, generator=generator)
    return images


def export_targets(model: nn.Module, shape: Optional[Sequence[int]] = None, batch_size: int = 2,
                   kind: str = 'noise', seed: int = 0) -> List[ExportTarget]:
    """The graphs to export for ``model`` (an eval-mode model from :func:`~sparsevit_mm.apis.init_model`), with
    example inputs of ``batch_size`` at ``shape`` (H, W; default :func:`default_shape`).

    Raises :class:`NotExportable` for a model that is not ours, and ValueError for a shape it cannot take.
    """
    part = sparse_model_part(model)
    height, width = _resolve_shape(model, shape)
    if isinstance(part, DVT):
        if (height, width) != (224, 224):
            raise ValueError(f'DVT exits are built for 224x224 inputs; got --shape {height} {width}')
        return _dvt_targets(part, example_images(batch_size, 224, 224, kind, seed))
    if isinstance(part, (UViTDiffusion, UViT)):
        return [_uvit_target(part, height, width, batch_size, kind, seed)]
    images = example_images(batch_size, height, width, kind, seed)
    if part is not model and getattr(model, 'head', None) is not None and _is_mmpretrain(model):
        wrapper = ClassifierLogits(model).train(model.training)
        return [ExportTarget('classifier', wrapper, (images, ), ('images', ), ('logits', ))]
    return [ExportTarget('backbone', part, (images, ), ('images', ), _feature_names(part, images))]


def _is_mmpretrain(model: nn.Module) -> bool:
    return any(cls.__module__.startswith('mmpretrain.') for cls in type(model).__mro__)


def _resolve_shape(model, shape) -> Tuple[int, int]:
    if shape is None or len(shape) == 0:
        default = default_shape(model)
        if default is None:
            raise ValueError(f'{type(sparse_model_part(model)).__name__} in {type(model).__name__} takes any input '
                             'size: give the shape to export (--shape H W, e.g. 224 224, 800 1344 for an mmdet test '
                             'image of 800x1333 padded to 32, or 512 512 for an ADE20K segmentor)')
        return default
    if len(shape) not in (1, 2) or any(int(s) <= 0 for s in shape):
        raise ValueError(f'shape must be H or H W (positive), got {list(shape)}')
    return int(shape[0]), int(shape[-1])


def _feature_names(backbone: nn.Module, images: torch.Tensor) -> Tuple[str, ...]:
    with torch.no_grad():
        outputs = backbone(images[:1])
    count = len(outputs) if isinstance(outputs, (tuple, list)) else 1
    return tuple(f'features_{i}' for i in range(count))


def _uvit_target(part, height, width, batch_size, kind, seed) -> ExportTarget:
    network = part.network if isinstance(part, UViTDiffusion) else part
    if (height, width) != (network.img_size, network.img_size):
        raise ValueError(f'U-ViT was built for {network.img_size}x{network.img_size} inputs (its position embedding '
                         f'has one row per patch); got --shape {height} {width}')
    generator = torch.Generator().manual_seed(seed)
    x_t = example_images(batch_size, height, width, kind, seed, channels=network.in_channels)
    t = torch.rand(batch_size, generator=generator).clamp_min(1e-3)
    timesteps = part.schedule.network_time(t) if isinstance(part, UViTDiffusion) else t * 999.0
    inputs, names = (x_t, timesteps), ('x_t', 'timesteps')
    if network.num_classes > 0:
        inputs += (torch.randint(0, network.num_classes, (batch_size, ), generator=generator), )
        names += ('labels', )
    return ExportTarget('network', network, inputs, names, ('noise', ))


def _dvt_targets(dvt: DVT, images: torch.Tensor) -> List[ExportTarget]:
    targets, handed_on = [], ()
    for index in range(len(dvt.exits)):
        step = DVTExitStep(dvt, index).eval()
        inputs = (images, *handed_on)
        targets.append(ExportTarget(f'exit{index + 1}', step, inputs, step.input_names, step.output_names))
        with torch.no_grad():
            handed_on = tuple(step(*inputs)[1:])
    return targets


# ---------------------------------------------------------------------------------------------------------------------
# Export, reload, compare
# ---------------------------------------------------------------------------------------------------------------------

def _batch_dims(target: ExportTarget, dynamic_batch: bool) -> Optional[Dict[str, dict]]:
    """``dynamic_shapes`` for torch.export: dimension 0 of every input is one shared batch size, keyed by the
    forward's parameter names (robust to optional trailing parameters)."""
    if not dynamic_batch:
        return None
    batch = torch.export.Dim('batch', min=1, max=65536)
    bound = inspect.signature(target.module.forward).bind(*target.inputs)
    return {name: ({0: batch} if isinstance(value, torch.Tensor) else tuple({0: batch} for _ in value))
            for name, value in bound.arguments.items()}


def export_program(target: ExportTarget, dynamic_batch: bool = False) -> torch.export.ExportedProgram:
    """``torch.export`` of one target (inference: autograd off; with ``dynamic_batch`` any batch size runs).

    The example batch must be >= 2 for a dynamic batch (a batch of 1 would be specialised into the graph).
    """
    _check_example_batch(target, dynamic_batch)
    with torch.no_grad():
        return torch.export.export(target.module, target.inputs, dynamic_shapes=_batch_dims(target, dynamic_batch))


def _check_example_batch(target: ExportTarget, dynamic_batch: bool):
    if dynamic_batch and target.inputs[0].shape[0] < 2:
        raise ValueError('a dynamic batch is exported from example inputs of batch >= 2 (torch.export specialises '
                         'a size of 1)')


def export(target: ExportTarget, path: str, format: str, dynamic_batch: bool = False) -> List[str]:
    """Write ``target`` to ``path`` as ``format`` (``'torch-export'``: a ``.pt2`` archive for ``torch.export.load``;
    ``'onnx'``: an ONNX file through PyTorch's ``torch.export``-based exporter, which needs the ``onnx`` and
    ``onnxscript`` packages, see ``pip install .[deploy]``). Returns the files written."""
    if format not in FORMATS:
        raise ValueError(f'format must be one of {sorted(FORMATS)}, got {format!r}')
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if format == 'torch-export':
        torch.export.save(export_program(target, dynamic_batch), path)
        return [path]
    _check_example_batch(target, dynamic_batch)
    weight_bytes = sum(p.numel() * p.element_size() for p in target.module.parameters())
    external = weight_bytes > _ONNX_SINGLE_FILE_LIMIT
    try:
        # The module, not a program from export_program: the ONNX exporter's own trace keeps attention as
        # scaled_dot_product_attention (a CPU program holds the CPU flash kernel, whose decomposition breaks views).
        with torch.no_grad():
            onnx_program = torch.onnx.export(target.module, target.inputs, dynamo=True, verbose=False,
                                             dynamic_shapes=_batch_dims(target, dynamic_batch),
                                             input_names=list(target.input_names),
                                             output_names=list(target.output_names), external_data=external)
    except ImportError as error:  # onnx / onnxscript are an optional extra
        raise ImportError(f'ONNX export needs the deploy extra ({error}): pip install -e ".[deploy]" (the test '
                          'environment of tools/install.sh has it)') from error
    onnx_program.save(path, external_data=external)
    return [path] + ([path + '.data'] if external and os.path.exists(path + '.data') else [])


Runner = Callable[..., List[torch.Tensor]]


def load_exported(path: str, threads: Optional[int] = None) -> Runner:
    """An exported file as a function of torch tensors returning a list of tensors: ``.pt2`` through
    ``torch.export.load``, ``.onnx`` through an ONNX Runtime CPU session (``threads`` intra-op threads; default:
    torch's CPU thread count, so both run on the same cores)."""
    if path.endswith('.pt2'):
        module = torch.export.load(path).module()

        def run_program(*inputs):
            return as_list(module(*inputs))
        return run_program
    if not path.endswith('.onnx'):
        raise ValueError(f'{path}: exported files end in .pt2 (torch.export) or .onnx')
    session = onnxruntime_session(path, threads)
    names = [i.name for i in session.get_inputs()]

    def run_session(*inputs):
        outputs = session.run(None, {name: x.detach().cpu().numpy() for name, x in zip(names, inputs)})
        return [torch.from_numpy(output) for output in outputs]
    return run_session


def onnxruntime_session(path: str, threads: Optional[int] = None):
    """An ONNX Runtime CPU inference session on ``path`` with all graph optimisations."""
    try:
        import onnxruntime
    except ImportError as error:
        raise ImportError('running ONNX files needs onnxruntime: pip install -e ".[deploy]"') from error
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    return onnxruntime.InferenceSession(path, options, providers=['CPUExecutionProvider'])


def as_list(outputs) -> List[torch.Tensor]:
    """A module's output (a tensor, or a tuple / list of them) as a list of tensors."""
    return list(outputs) if isinstance(outputs, (tuple, list)) else [outputs]


def eager_outputs(target: ExportTarget, inputs: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    with torch.no_grad():
        return as_list(target.module(*inputs))


def max_difference(ours: Sequence[torch.Tensor], reference: Sequence[torch.Tensor]) -> float:
    """Largest absolute difference over all outputs (they must match in number and shape)."""
    if len(ours) != len(reference):
        raise ValueError(f'{len(ours)} outputs, expected {len(reference)}')
    worst = 0.0
    for index, (a, b) in enumerate(zip(ours, reference)):
        if a.shape != b.shape:
            raise ValueError(f'output {index} has shape {tuple(a.shape)}, expected {tuple(b.shape)}')
        worst = max(worst, (a.float() - b.float()).abs().max().item() if a.numel() else 0.0)
    return worst


def comparison_cases(targets: Sequence[ExportTarget], batch_sizes: Sequence[int],
                     seed: int = 1) -> Dict[str, List[tuple]]:
    """Inputs to compare exported targets with eager on: for each batch size, noise and image-like inputs at the
    export shape -> per case one input tuple per target. A DVT exit's hand-over inputs are what the eager previous
    exit gives on the same images, so that each exit is compared on its own."""
    cases = {}
    for batch in batch_sizes:
        for kind in ('noise', 'image'):
            per_target, handed_on = [], ()
            for target in targets:
                first = target.inputs[0]
                images = example_images(batch, *first.shape[-2:], kind, seed, channels=first.shape[1])
                if target.input_names[0] == 'x_t':  # U-ViT: fresh x_t, the example's timesteps / labels
                    rest = tuple(x[:1].expand(batch, *x.shape[1:]).contiguous() for x in target.inputs[1:])
                else:
                    rest = handed_on
                inputs = (images, *rest)
                per_target.append(inputs)
                if isinstance(target.module, DVTExitStep):
                    handed_on = tuple(eager_outputs(target, inputs)[1:])
            cases[f'{kind}, batch {batch}'] = per_target
    return cases
