"""Shared token-sparsity primitives."""
import pytest
import torch

from sparsevit_mm.layers import (KeepPolicyAttention, SlowFastRouting, TokenScorePredictor, batch_gather,
                                 batch_scatter, check_prune_layers, keep_ratio_loss, num_kept, sample_keep_decision,
                                 softmax_with_keep_policy, split_by_score, stage_keep_ratios, topk_indices)


def test_gather_scatter_match_indexing():
    tokens = torch.randn(3, 10, 4)
    index = torch.stack([torch.randperm(10)[:4] for _ in range(3)])
    gathered = batch_gather(tokens, index)
    for b in range(3):
        assert torch.equal(gathered[b], tokens[b, index[b]])
    target = torch.zeros(3, 10, 4)
    scattered = batch_scatter(target, index, gathered)
    for b in range(3):
        assert torch.equal(scattered[b, index[b]], tokens[b, index[b]])
        rest = torch.ones(10, dtype=torch.bool)
        rest[index[b]] = False
        assert torch.all(scattered[b, rest] == 0)
    assert torch.all(target == 0), 'batch_scatter must not modify its input'


def test_slow_fast_routing_inference_equals_the_masked_mixture():
    """Gathering each path's rows and adding them back is the training mixture with a hard mask."""
    torch.manual_seed(0)
    residual, tokens = torch.randn(2, 12, 8), torch.randn(2, 12, 8)
    slow_fn, fast_fn = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)
    slow, fast = split_by_score(torch.randn(2, 12), 5)
    mask = torch.zeros(2, 12, 1).scatter(1, slow.unsqueeze(-1), 1.0)
    expected = SlowFastRouting(mask=mask).residual_update(residual, tokens, slow_fn, fast_fn)
    assert torch.allclose(expected, residual + mask * slow_fn(tokens) + (1 - mask) * fast_fn(tokens), atol=1e-6)
    routing = SlowFastRouting.from_indices(slow, fast, 12)

    original = residual.clone()
    out = routing.residual_update(residual, tokens, slow_fn, fast_fn)  # autograd on: the input stays as it was
    assert torch.allclose(out, expected, atol=1e-6) and torch.equal(residual, original)
    out.sum().backward()
    assert slow_fn.weight.grad.abs().sum() > 0 and fast_fn.weight.grad.abs().sum() > 0
    with torch.no_grad():
        out = routing.residual_update(residual, tokens, slow_fn, fast_fn)
    assert torch.allclose(out, expected, atol=1e-6)
    assert out.data_ptr() == residual.data_ptr(), 'without autograd the update is added in place'


def test_topk_and_split_by_score():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.3], [4.0, 3.0, 2.0, 1.0]])
    assert topk_indices(scores, 2).tolist() == [[1, 2], [0, 1]]
    best, rest = split_by_score(scores, 1)
    assert best.tolist() == [[1], [0]]
    assert sorted(rest[0].tolist()) == [0, 2, 3] and sorted(rest[1].tolist()) == [1, 2, 3]


def test_num_kept_matches_paper_counts():
    # DynamicViT keeps int(196 * r**s): 137 / 96 / 67 at r=0.7 and 98 / 49 / 24 at r=0.5.
    assert [num_kept(196, r) for r in stage_keep_ratios(0.7, 3)] == [137, 96, 67]
    assert [num_kept(196, r) for r in stage_keep_ratios(0.5, 3)] == [98, 49, 24]
    # Dynamic Swin / ConvNeXt slow-path counts: 137 / 97 / 58 at r=0.7.
    assert [num_kept(196, r) for r in stage_keep_ratios(0.7, 3, 'linear')] == [137, 97, 58]
    assert num_kept(3, 0.01) == 1


@pytest.mark.parametrize('bad', [0.0, -0.1, 1.5, [0.7, 0.8, 0.5], [0.7, 0.5]])
def test_bad_keep_ratios_raise_naming_the_value(bad):
    with pytest.raises(ValueError, match='keep'):
        stage_keep_ratios(bad, 3)


def test_linear_schedule_rejects_a_ratio_that_empties_the_last_stage():
    with pytest.raises(ValueError, match='0.40'):
        stage_keep_ratios(0.4, 3, 'linear')
    assert stage_keep_ratios(1.0, 3, 'linear') == [1.0, 1.0, 1.0]


@pytest.mark.parametrize('layers', [[-1, 3, 6], [3, 12], [6, 3], [3, 3], []])
def test_bad_prune_layers_raise(layers):
    with pytest.raises(ValueError, match='prune_layers'):
        check_prune_layers(layers, depth=12)


def test_keep_decisions_are_hard_nested_and_differentiable():
    torch.manual_seed(0)
    logits = torch.randn(2, 50, 2, requires_grad=True)
    previous = (torch.rand(2, 50, 1) > 0.5).float()
    decision = sample_keep_decision(torch.log_softmax(logits, -1), previous)
    assert set(decision.unique().tolist()) <= {0.0, 1.0}
    assert torch.all(decision <= previous), 'a token dropped earlier must stay dropped'
    decision.sum().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_keep_ratio_loss_value():
    decisions = [torch.tensor([[1., 1., 0., 0.], [1., 1., 1., 1.]]), torch.tensor([[1., 0., 0., 0.], [0., 0., 0., 0.]])]
    expected = (((0.5 - 0.5) ** 2 + (1.0 - 0.5) ** 2) / 2 + ((0.25 - 0.25) ** 2 + (0 - 0.25) ** 2) / 2) / 2
    assert keep_ratio_loss(decisions, [0.5, 0.25]).item() == pytest.approx(expected)
    with pytest.raises(ValueError, match='targets'):
        keep_ratio_loss(decisions, [0.5])


def test_policy_softmax_masks_dropped_keys_and_keeps_gradients():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 6, 6)
    policy = torch.tensor([[1., 1., 0., 1., 0., 1.], [1., 1., 1., 1., 1., 1.]], requires_grad=True)
    weights = softmax_with_keep_policy(logits, policy)
    assert torch.allclose(weights.sum(-1), torch.ones(2, 3, 6), atol=1e-5)
    # Nobody but itself attends to dropped token 2 (only the eps leak remains).
    others = [0, 1, 3, 4, 5]
    assert weights[0, :, others, 2].max() < 1e-5
    assert weights[0, :, 2, 2].min() > 1e-3, 'a dropped token still attends to itself'
    # All kept: identical to softmax.
    assert torch.allclose(weights[1], logits[1].softmax(-1), atol=1e-5)
    weights[0, :, 0].pow(2).sum().backward()
    assert policy.grad[0].abs().sum() > 0


def test_attention_policy_of_ones_equals_plain_attention():
    torch.manual_seed(0)
    attn = KeepPolicyAttention(32, 4).eval()
    x = torch.randn(2, 9, 32)
    assert torch.allclose(attn(x), attn(x, torch.ones(2, 9)), atol=1e-5)
    with pytest.raises(ValueError, match='divisible'):
        KeepPolicyAttention(30, 4)


def test_predictor_global_context_ignores_dropped_tokens():
    torch.manual_seed(0)
    predictor = TokenScorePredictor(16).eval()
    x = torch.randn(1, 8, 16)
    policy = torch.tensor([1., 1., 1., 1., 0., 0., 0., 0.]).reshape(1, 8, 1)
    out = predictor(x, policy)
    assert out.shape == (1, 8, 2)
    assert torch.allclose(out.exp().sum(-1), torch.ones(1, 8), atol=1e-5)
    # Changing a dropped token must not change the scores of the kept ones.
    x2 = x.clone()
    x2[0, 6] = torch.randn(16) * 3
    assert torch.allclose(predictor(x2, policy)[0, :4], out[0, :4], atol=1e-6)
    # Without a policy the context is the mean of all tokens: the first four scores change.
    assert not torch.allclose(predictor(x2)[0, :4], predictor(x)[0, :4])
