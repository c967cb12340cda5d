"""Keep-policy attention without (B, H, N, N) tensors equals the official formula written out directly."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import sparsevit_mm.layers.attention as attention
from sparsevit_mm.layers import keep_ratio_loss, keep_policy_attention, softmax_with_keep_policy
from sparsevit_mm.models import DynamicViT


def direct(query, key, value, policy, scale, eps=1e-6):
    """The reference: the official formula over the full (B, H, N, N) logits."""
    return softmax_with_keep_policy((query * scale) @ key.transpose(-2, -1), policy, eps) @ value


def make_inputs(batch=2, heads=3, tokens=37, head_dims=8, case='mixed', seed=0):
    generator = torch.Generator().manual_seed(seed)
    query, key, value = (torch.randn(batch, heads, tokens, head_dims, generator=generator) for _ in range(3))
    policy = (torch.rand(batch, tokens, generator=generator) > 0.4).float()
    if case == 'cls only':
        policy.zero_()
    elif case == 'all kept':
        policy.fill_(1.0)
    elif case == 'max on a dropped key':
        # key 1 is dropped and every query's largest logit sits on it, about 7 above the kept keys' largest: the
        # normaliser Z_i over the kept keys is about exp(-7), so the eps terms and the max's own gradient show
        policy[:, 1] = 0.0
        query[..., 0] += 4.0
        key[:, :, 1] = 0.0
        key[:, :, 1, 0] = 8.0
    policy[:, 0] = 1.0  # the cls token is always kept
    return [t.requires_grad_(True) for t in (query, key, value, policy)]


def relative_error(ours, reference, floor=1e-30):
    """Largest difference over the largest reference value (at least ``floor``: a gradient that is exactly 0
    in the reference is compared on the scale of its neighbours)."""
    scale = reference.float().abs().max().clamp_min(floor)
    return ((ours.float() - reference.float()).abs().max() / scale).item()


def outputs_and_gradients(fn, inputs, eps=1e-6, autocast=None):
    query, key, value, policy = inputs
    scale = query.shape[-1] ** -0.5
    with torch.autocast('cpu', torch.bfloat16, enabled=autocast is not None):
        out = fn(query, key, value, policy, scale, eps)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    grads = torch.autograd.grad(out.float(), inputs, grad_out)
    return (out, *grads)


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of 7 query rows, so that 37 tokens span six blocks, the last one partial."""
    monkeypatch.setitem(attention._BLOCK_LOGITS, 'cpu', 1)
    monkeypatch.setattr(attention, '_MIN_BLOCK_ROWS', 7)


@pytest.mark.parametrize('case', ['mixed', 'cls only', 'all kept', 'max on a dropped key'])
@pytest.mark.parametrize('eps', [1e-6, 0.3])
def test_equals_the_direct_formula_outputs_and_every_gradient(case, eps, small_blocks):
    # eps = 0.3 makes the eps terms large enough that leaving one out shows far above float32 rounding
    inputs = make_inputs(case=case)
    ours = outputs_and_gradients(keep_policy_attention, inputs, eps)
    reference = outputs_and_gradients(direct, inputs, eps)
    for name, a, b in zip(('output', 'd query', 'd key', 'd value', 'd policy'), ours, reference):
        assert a.shape == b.shape, name
        assert relative_error(a, b) < 1e-5, f'{case}, eps {eps}: {name} differs by {relative_error(a, b):.2e}'
    # the policy gradient is non-zero at dropped keys: a predictor learns that a dropped token should have stayed
    dropped = inputs[3].detach() == 0
    if dropped.any():
        assert ours[4][dropped].abs().max() > 0


def test_the_max_on_a_dropped_key_case_is_where_the_eps_terms_matter():
    """The case above is not vacuous: there, the direct formula without its eps terms is far off (elsewhere they
    are below float32 rounding)."""
    for case, least in (('max on a dropped key', 1e-3), ('mixed', 0.0)):
        inputs = make_inputs(case=case)
        with_eps = outputs_and_gradients(direct, inputs, eps=1e-6)
        without_eps = outputs_and_gradients(direct, inputs, eps=1e-30)
        differences = [relative_error(a, b) for a, b in zip(without_eps, with_eps)]
        assert min(differences) > least if least else max(differences) < 1e-5, (case, differences)
    with pytest.raises(ValueError, match='eps must be > 0'):
        keep_policy_attention(*inputs[:4], 0.3, eps=0.0)


def test_an_empty_batch_and_a_single_token():
    for batch, tokens in ((0, 9), (2, 1)):
        inputs = make_inputs(batch=batch, tokens=tokens)
        ours = outputs_and_gradients(keep_policy_attention, inputs)
        assert ours[0].shape == (batch, 3, tokens, 8) and ours[4].shape == (batch, tokens)
        if batch:
            reference = outputs_and_gradients(direct, inputs)
            # with the cls token alone, every weight is 1 whatever the logits: the reference's gradients to query,
            # key and policy are exactly 0, ours are 0 up to float32 rounding of O(1) terms
            assert all(relative_error(a, b, floor=1.0) < 1e-5 for a, b in zip(ours, reference))


def test_bfloat16_autocast_is_as_close_to_float32_as_the_direct_formula_is():
    inputs = make_inputs(tokens=50, head_dims=16)
    truth = outputs_and_gradients(direct, inputs)
    ours = outputs_and_gradients(keep_policy_attention, inputs, autocast='bf16')
    reference = outputs_and_gradients(direct, inputs, autocast='bf16')
    for name, a, b, t in zip(('output', 'd query', 'd key', 'd value', 'd policy'), ours, reference, truth):
        ours_error, reference_error = relative_error(a, t), relative_error(b, t)
        assert ours_error < max(2 * reference_error, 1e-2), f'{name}: {ours_error:.2e} vs {reference_error:.2e}'


def test_a_soft_policy_is_refused():
    query, key, value, policy = make_inputs()
    with pytest.raises(ValueError, match='0 / 1 keep policy.*0.5'):
        keep_policy_attention(query, key, value, policy * 0.5, 0.3)


def tiny_vit(**kwargs):
    torch.manual_seed(0)
    model = DynamicViT(arch=dict(embed_dims=64, num_layers=4, num_heads=4), img_size=64, patch_size=16,
                       prune_layers=[1, 2, 3], keep_ratio=0.7, **kwargs)
    model.init_weights()
    return model.train()


def training_gradients(model, images, attention_fn, monkeypatch):
    monkeypatch.setattr(attention, 'keep_policy_attention', attention_fn)
    model.zero_grad()
    torch.manual_seed(1)  # the same Gumbel noise for both runs
    result = model.forward_sparse(images)
    # a fixed random readout of the map (not its mean square, which the final LayerNorm makes constant)
    readout = torch.randn(result.outs[0].shape, generator=torch.Generator().manual_seed(2))
    loss = (result.outs[0] * readout).mean() + keep_ratio_loss(result.keep_decisions, model.stage_ratios)
    loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize('with_cp', [False, True])
def test_a_dynamicvit_training_step_gets_the_same_gradients_in_every_parameter(monkeypatch, with_cp):
    model = tiny_vit(out_type='featmap', with_cp=with_cp)
    images = torch.randn(2, 3, 64, 96)
    ours = training_gradients(model, images, keep_policy_attention, monkeypatch)
    reference = training_gradients(model, images, direct, monkeypatch)
    assert ours.keys() == reference.keys()
    assert any(name.startswith('score_predictors.0.') for name in ours)
    largest = max(g.abs().max() for g in reference.values())
    for name in ours:
        error = relative_error(ours[name], reference[name], floor=1e-3 * largest)
        assert error < 1e-5, f'{name}: {error:.2e}'


class LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an aten op returns, backward ops included."""

    def __init__(self):
        super().__init__()
        self.numel, self.op = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in (out if isinstance(out, (tuple, list)) else (out, )):
            if isinstance(tensor, torch.Tensor) and tensor.numel() > self.numel:
                self.numel, self.op = tensor.numel(), func
        return out


def test_a_training_step_at_2000_tokens_holds_no_token_by_token_tensor():
    # 45 x 45 patches + cls = 2,026 tokens. The direct formula returns (B, H, N, N) float32 logits (and a
    # (B, 1, N, N) mask); nothing here may be as large as one (B, N, N) tensor.
    model = DynamicViT(arch=dict(embed_dims=32, num_layers=3, num_heads=2), img_size=720, patch_size=16,
                       prune_layers=[1], keep_ratio=0.7, out_type='featmap').train()
    images = torch.randn(1, 3, 720, 720)
    tokens = 45 * 45 + 1
    with LargestTensor() as largest:
        result = model.forward_sparse(images)
        (result.outs[0].pow(2).mean() + keep_ratio_loss(result.keep_decisions, model.stage_ratios)).backward()
    assert model.score_predictors[0].classifier[0].weight.grad.abs().sum() > 0
    assert largest.numel < tokens * tokens, f'{largest.op} returned {largest.numel} elements (N * N = {tokens ** 2})'
