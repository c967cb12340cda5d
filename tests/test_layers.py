"""Shared token-sparsity primitives."""
import pytest
import torch
from timm.layers import Attention
from timm.models.vision_transformer import Block

from sparsevit_mm.layers import (KeepPolicyAttention, SlowFastRouting, TokenPruning, TokenScorePredictor, batch_gather,
                                 batch_scatter, check_prune_layers, keep_ratio_loss, num_kept, sample_keep_decision,
                                 softmax_with_keep_policy, split_by_score, stage_keep_ratios, topk_indices)
from sparsevit_mm.models.backbones.dvt_exit import RelationAttention
from sparsevit_mm.models.backbones.dynamic_vit import DynamicViTBlock
from sparsevit_mm.models.backbones.uvit import UViTBlock


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


def test_attention_without_a_policy_is_timms_own():
    torch.manual_seed(0)
    attn = KeepPolicyAttention(32, 4).eval()
    plain = Attention(32, 4, qkv_bias=True).eval()
    plain.load_state_dict(attn.state_dict())
    x = torch.randn(2, 9, 32)
    assert torch.equal(attn(x), plain(x))


def test_timm_subclasses_keep_the_official_state_dict_keys():
    attn = KeepPolicyAttention(32, 4)
    assert isinstance(attn, Attention)
    assert list(attn.state_dict()) == ['qkv.weight', 'qkv.bias', 'proj.weight', 'proj.bias']
    block = DynamicViTBlock(32, 4, mlp_ratio=2.0, qkv_bias=False, residual_scale=2.0)
    assert isinstance(block, Block) and isinstance(block.attn, KeepPolicyAttention) and block.norm1.eps == 1e-6
    assert list(block.state_dict()) == [
        'norm1.weight', 'norm1.bias', 'attn.qkv.weight', 'attn.proj.weight', 'attn.proj.bias', 'norm2.weight',
        'norm2.bias', 'mlp.fc1.weight', 'mlp.fc1.bias', 'mlp.fc2.weight', 'mlp.fc2.bias']
    out_block = UViTBlock(32, 4, skip=True)
    assert isinstance(out_block, Block) and isinstance(out_block.attn, Attention) and out_block.norm1.eps == 1e-5
    assert sorted(out_block.state_dict()) == sorted([
        'skip_linear.weight', 'skip_linear.bias', 'norm1.weight', 'norm1.bias', 'attn.qkv.weight', 'attn.proj.weight',
        'attn.proj.bias', 'norm2.weight', 'norm2.bias', 'mlp.fc1.weight', 'mlp.fc1.bias', 'mlp.fc2.weight',
        'mlp.fc2.bias'])
    relation = RelationAttention(32, 4)
    assert isinstance(relation, Attention)
    assert list(relation.state_dict()) == ['qkv.weight', 'proj.weight', 'proj.bias']


def _score_by_first_channel(patches, policy=None):
    """A stand-in score predictor: (B, N, C) -> (B, N, 2) with the keep score = the first channel."""
    return torch.stack([patches[..., 0], -patches[..., 0]], dim=-1)


def test_token_pruning_inference_keeps_the_best_tokens_and_fills_the_map_back():
    torch.manual_seed(0)
    tokens = torch.randn(2, 9, 4)  # cls + 8 patch tokens
    order = tokens[:, 1:, 0].argsort(dim=1, descending=True)  # absolute patch positions, best first
    pruning = TokenPruning(num_patches=8, keep_dropped=True)
    x = pruning.select(_score_by_first_channel, tokens, 0.5)
    assert torch.equal(pruning.kept, order[:, :4])
    assert torch.equal(x, torch.stack([tokens[b, [0, *(order[b, :4] + 1).tolist()]] for b in range(2)]))
    x = pruning.select(_score_by_first_channel, 2 * x, 0.25)  # as if a block had doubled the kept tokens
    assert torch.equal(pruning.kept, order[:, :2]), 'kept holds absolute positions'
    assert x.shape == (2, 3, 4) and torch.equal(x[:, 0], 2 * tokens[:, 0])
    featmap = pruning.fill_back(3 * x[:, 1:])
    for b in range(2):
        ranks = order[b].tolist()
        for position in range(8):
            rank = ranks.index(position)
            scale = 6 if rank < 2 else 2 if rank < 4 else 1  # kept to the end / dropped at stage 2 / at stage 1
            assert torch.equal(featmap[b, position], scale * tokens[b, 1 + position])
    assert pruning.decision is None and pruning.policy is None


def test_token_pruning_training_decisions_nest_and_the_policy_keeps_the_cls_token():
    tokens = torch.randn(2, 9, 4)
    seen_policies = []

    def predictor(patches, policy=None):
        seen_policies.append(policy)
        keep = torch.tensor([1., 1., 1., 1., 0., 0., 0., 0.]) if len(seen_policies) == 1 else torch.ones(8)
        return torch.stack([(keep - 1) * 1e4, -keep * 1e4], dim=-1).expand(2, -1, -1)  # certain decisions

    pruning = TokenPruning(num_patches=8)
    first = pruning.sample(predictor, tokens)
    assert torch.equal(first, torch.tensor([[1., 1., 1., 1., 0., 0., 0., 0.]] * 2))
    assert torch.equal(seen_policies[0], torch.ones(2, 8, 1))
    second = pruning.sample(predictor, tokens)
    assert torch.equal(second, first), 'a token dropped earlier stays dropped'
    assert torch.equal(seen_policies[1], first.unsqueeze(-1)), 'the predictor scores over the tokens still kept'
    assert torch.equal(pruning.policy, torch.cat([torch.ones(2, 1), first], dim=1))
    assert pruning.kept is None and pruning.dropped is None
