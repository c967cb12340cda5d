"""Mixed precision and CUDA: every family under autocast (bf16 on the CPU in the default suite; fp16 and bf16 on a
GPU), a training step under autocast, and the GPU-only checks (mmengine's AmpOptimWrapper, torch.compile with CUDA
graphs, the keep-policy attention's memory on CUDA, whole detector / segmentor test steps).

The GPU tests carry the ``cuda`` marker (``pytest -m cuda`` selects them) and are skipped without a GPU.
"""
import pytest
import torch

from sparsevit_mm.deployment import as_list
from sparsevit_mm.layers import keep_policy_attention, keep_ratio_terms, softmax_with_keep_policy

from .helpers import load_tool, tiny_family

CUDA = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')]


def needs_cuda(test):
    """The ``cuda`` marker (``pytest -m cuda``) and the skip without a GPU."""
    for mark in reversed(CUDA):
        test = mark(test)
    return test
FAMILIES = ['dynamicvit', 'swin', 'convnext', 'dvt', 'uvit']
SPARSE_BACKBONES = ['dynamicvit', 'swin', 'convnext']
PRECISIONS = [pytest.param('cpu', torch.bfloat16, id='cpu-bf16'),
              pytest.param('cuda', torch.float16, id='cuda-fp16', marks=CUDA),
              pytest.param('cuda', torch.bfloat16, id='cuda-bf16', marks=CUDA)]


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return ((ours.float() - reference.float()).abs().max() / reference.float().abs().max().clamp_min(1e-12)).item()


def family_on(family: str, device: str, keep_ratio=None):
    torch.manual_seed(0)
    model, inputs = tiny_family(family)
    if keep_ratio is not None:
        model.keep_ratio = keep_ratio
    return model.to(device), tuple(x.to(device) for x in inputs)


def training_loss(family: str, model, inputs) -> torch.Tensor:
    """A loss over every output (and, for the token-sparse families, the keep-ratio loss of the decisions)."""
    outputs = as_list(model(*inputs))
    loss = sum(out.float().square().mean() for out in outputs)
    if family in SPARSE_BACKBONES:  # a learning forward's decisions must be consumed (KeepRatioLossHook does it)
        terms = keep_ratio_terms(model.pop_keep_decisions(), model.stage_ratios, 2.0)
        loss = loss + terms['loss_keep_ratio']
    return loss


@pytest.mark.parametrize('device,dtype', PRECISIONS)
@pytest.mark.parametrize('family', FAMILIES)
def test_autocast_inference_is_finite_and_close_to_float32(family, device, dtype):
    """Low-precision outputs are compared with float32 where the same tokens run (DVT, U-ViT, and the token-sparse
    families at keep 1.0); at keep 0.7 a score that rounds differently may swap a token, so there they must be
    finite and shaped alike."""
    settings = [(1.0, True), (0.7, False)] if family in SPARSE_BACKBONES else [(None, True)]
    for keep_ratio, compare in settings:
        model, inputs = family_on(family, device, keep_ratio)
        with torch.no_grad():
            reference = as_list(model(*inputs))
            with torch.autocast(device, dtype=dtype):
                low = as_list(model(*inputs))
        assert [o.shape for o in low] == [o.shape for o in reference]
        for out, ref in zip(low, reference):
            assert torch.isfinite(out).all(), (family, keep_ratio)
            if compare:
                assert relative_error(out, ref) < 0.05, (family, keep_ratio, relative_error(out, ref))


@pytest.mark.parametrize('device,dtype', PRECISIONS)
@pytest.mark.parametrize('family', FAMILIES)
def test_autocast_training_step_has_finite_gradients_and_learns(family, device, dtype):
    """Three steps under autocast: finite gradients, and the (deterministic, eval-mode) objective goes down."""
    model, inputs = family_on(family, device)
    before = eval_objective(model, inputs, device, dtype)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(3):
        with torch.autocast(device, dtype=dtype):
            loss = training_loss(family, model, inputs)
        optimizer.zero_grad()
        loss.backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads), family
        optimizer.step()
    after = eval_objective(model, inputs, device, dtype)
    assert after < before, (family, before, after)


def eval_objective(model, inputs, device, dtype) -> float:
    model.eval()
    with torch.no_grad(), torch.autocast(device, dtype=dtype):
        return sum(out.float().square().mean() for out in as_list(model(*inputs))).item()


# --------------------------------------------------------------------------------------------------- GPU only
@pytest.mark.parametrize('dtype', ['float16', 'bfloat16'])
@pytest.mark.parametrize('family', FAMILIES)
@needs_cuda
def test_amp_optim_wrapper_training_step(family, dtype):
    """mmengine's AmpOptimWrapper (what --amp and the amp configs use): loss scaling, finite steps."""
    from mmengine.optim import AmpOptimWrapper
    model, inputs = family_on(family, 'cuda')
    before = eval_objective(model, inputs, 'cuda', getattr(torch, dtype))
    model.train()
    wrapper = AmpOptimWrapper(optimizer=torch.optim.SGD(model.parameters(), lr=0.01), dtype=dtype)
    for _ in range(3):
        with wrapper.optim_context(model):
            loss = training_loss(family, model, inputs)
        wrapper.update_params(loss)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert eval_objective(model, inputs, 'cuda', getattr(torch, dtype)) < before, family


@pytest.mark.parametrize('family', SPARSE_BACKBONES)
@needs_cuda
def test_compiled_sparse_backbones_match_eager_on_cuda(family):
    """torch.compile(fullgraph=True) at keep 0.7 (inductor, CUDA kernels) equals eager."""
    model, inputs = family_on(family, 'cuda')
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        eager = as_list(model(*inputs))
        for _ in range(2):
            ours = as_list(compiled(*inputs))
    assert max(relative_error(o, e) for o, e in zip(ours, eager)) < 1e-4


@needs_cuda
def test_cuda_graphs_replay_the_sparse_backbone():
    """mode='reduce-overhead' (CUDA graphs): the kept counts are static per input size, so the graph replays."""
    model, inputs = family_on('dynamicvit', 'cuda')
    torch._dynamo.reset()
    compiled = torch.compile(model, mode='reduce-overhead', fullgraph=True)
    with torch.no_grad():
        eager = as_list(model(*inputs))
        for _ in range(4):  # recorded on the first calls, replayed after
            ours = [o.clone() for o in as_list(compiled(*inputs))]
    assert max(relative_error(o, e) for o, e in zip(ours, eager)) < 1e-4


@needs_cuda
def test_keep_policy_attention_on_cuda_equals_the_direct_formula_in_bounded_memory():
    batch, heads, tokens, head_dims = 2, 6, 4201, 64  # a 800 x 1344 image's patch tokens and the cls token
    generator = torch.Generator(device='cuda').manual_seed(0)
    query, key, value = (torch.randn(batch, heads, tokens, head_dims, device='cuda', generator=generator)
                         for _ in range(3))
    policy = (torch.rand(batch, tokens, device='cuda', generator=generator) > 0.3).float()
    policy[:, 0] = 1.0
    leaves = [t.requires_grad_(True) for t in (query, key, value, policy)]
    scale = head_dims ** -0.5
    upstream = torch.randn(batch, heads, tokens, head_dims, device='cuda', generator=generator)

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    ours = keep_policy_attention(query, key, value, policy, scale)
    ours_grads = torch.autograd.grad(ours, leaves, upstream)
    peak = torch.cuda.max_memory_allocated() - before
    logits_bytes = batch * heads * tokens * tokens * 4  # one float32 (B, H, N, N) tensor: 847 MB here
    assert peak < logits_bytes / 2, f'peak {peak / 2**20:.0f} MiB; one N x N tensor: {logits_bytes / 2**20:.0f} MiB'

    reference = softmax_with_keep_policy((query * scale) @ key.transpose(-2, -1), policy) @ value
    reference_grads = torch.autograd.grad(reference, leaves, upstream)
    assert relative_error(ours, reference) < 1e-4
    for name, mine, theirs in zip('qkvp', ours_grads, reference_grads):
        assert relative_error(mine, theirs) < 1e-4, name


def whole_model_test_step(kind: str, keep_ratio: float, device: str, batch: int = 2, size=(800, 1216)):
    """The shipped DynamicViT-S Mask R-CNN ('mask-rcnn') or Segmenter ('segmenter') config's ``test_step`` on a
    batch as a dataloader gives it (random weights)."""
    from mmengine.registry import MODELS, DefaultScope

    from sparsevit_mm.utils.config import read_config
    configs = {'mask-rcnn': ('configs/dynamicvit/mask-rcnn_dynamicvit-deit-small-r0.7_simple-fpn_1x_coco.py', 'mmdet'),
               'segmenter': ('configs/dynamicvit/segmenter_dynamicvit-deit-small-r0.7_mask_8xb1-160k_ade20k-512x512.py',
                             'mmseg')}
    path, scope = configs[kind]
    cfg = read_config(path)
    cfg.model.backbone.init_cfg = None  # no weights file here
    cfg.model.backbone.keep_ratio = keep_ratio
    if kind == 'mask-rcnn':  # random weights score below mmdet's 0.05: keep boxes, so that the mask head runs too
        cfg.model.test_cfg.rcnn.score_thr = 0.0
    with DefaultScope.overwrite_default_scope(scope):
        model = MODELS.build(cfg.model)
        model.init_weights()
        model.to(device).eval()
        data = load_tool('tools/analysis/_benchmarking.py').test_step_data(scope, batch, *size)
        with torch.no_grad():
            return model.test_step(data)


@pytest.mark.parametrize('keep_ratio', [1.0, 0.7])
@pytest.mark.parametrize('kind', ['mask-rcnn', 'segmenter'])
@needs_cuda
def test_whole_detector_and_segmentor_test_step_on_cuda(kind, keep_ratio):
    if kind == 'mask-rcnn':
        try:
            from mmcv.ops import roi_align  # noqa: F401
        except ImportError:
            pytest.skip("mmcv's compiled ops are not installed (tools/install.sh builds them)")
    size = (800, 1216) if kind == 'mask-rcnn' else (512, 512)
    predictions = whole_model_test_step(kind, keep_ratio, 'cuda', size=size)
    assert len(predictions) == 2
    for prediction in predictions:
        if kind == 'mask-rcnn':
            assert len(prediction.pred_instances) > 0
            assert torch.isfinite(prediction.pred_instances.bboxes).all()
        else:
            assert prediction.pred_sem_seg.data.shape[-2:] == size
            assert torch.isfinite(prediction.seg_logits.data).all()
