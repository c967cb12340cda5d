"""DynamicViT backbone: archs, dense equivalence, pruning semantics, checkpoints, bad input."""
import pytest
import timm
import torch

from sparsevit_mm.models import DynamicViT
from sparsevit_mm.models.backbones.dynamic_vit import infer_backbone_kwargs, split_official, to_backbone_state_dict
from sparsevit_mm.utils import CheckpointMismatchError, load_weights

from .reference.official_vit import official_forward, random_official_state_dict


def small_vit(**kwargs):
    arch = dict(embed_dims=64, num_layers=6, num_heads=4, prune_layers=[1, 3, 5])
    return DynamicViT(arch=arch, img_size=64, patch_size=8, **kwargs)


@pytest.mark.parametrize('arch,dims,depth,prune', [
    ('deit-tiny', 192, 12, [3, 6, 9]), ('deit-256', 256, 12, [3, 6, 9]), ('deit-small', 384, 12, [3, 6, 9]),
    ('deit-base', 768, 12, [3, 6, 9]), ('lvvit-s', 384, 16, [4, 8, 12]), ('lvvit-m', 512, 20, [5, 10, 15])])
def test_arch_shapes_and_parameter_counts(arch, dims, depth, prune):
    model = DynamicViT(arch=arch, keep_ratio=0.7).eval()
    assert model.prune_layers == prune and len(model.blocks) == depth
    with torch.no_grad():
        result = model.forward_sparse(torch.randn(1, 3, 224, 224))
    assert result.outs[0].shape == (1, dims)
    assert [k.shape[1] for k in result.kept_indices] == [137, 96, 67]
    # Parameter counts of the backbones + predictors as instantiated from the official code (no heads).
    expected = {'deit-small': 22.77e6 - 385e3, 'deit-base': 89.45e6 - 769e3, 'lvvit-s': 26.88e6 - 770e3,
                'lvvit-m': 57.12e6 - 1026e3}
    if arch in expected:
        assert sum(p.numel() for p in model.parameters()) == pytest.approx(expected[arch], rel=2e-3)


def test_keep_ratio_one_equals_timm_deit_small():
    torch.manual_seed(0)
    reference = timm.create_model('deit_small_patch16_224', pretrained=False).eval()
    model = DynamicViT(arch='deit-small', keep_ratio=1.0, out_type='raw').eval()
    load_weights(model, to_backbone_state_dict(reference.state_dict()))
    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        expected = reference.forward_features(images)
        ours = model(images)[0]
    assert torch.allclose(ours, expected, atol=1e-5), (ours - expected).abs().max()
    # ... and the same logits through the timm head.
    with torch.no_grad():
        assert torch.allclose(reference.forward_head(ours), reference(images), atol=1e-5)


@pytest.mark.parametrize('lvvit', [False, True])
@pytest.mark.parametrize('batch', [1, 2, 3])
def test_official_checkpoint_reproduces_official_outputs(lvvit, batch):
    depth = 8 if lvvit else 6
    sd = random_official_state_dict(64, depth, mlp_ratio=3.0 if lvvit else 4.0, lvvit=lvvit, num_classes=7)
    loc = (2, 4, 6) if lvvit else (1, 3, 5)
    model = DynamicViT(arch=dict(embed_dims=64, num_layers=depth, num_heads=4, mlp_ratio=3.0 if lvvit else 4.0,
                                 qkv_bias=not lvvit, stem='conv' if lvvit else 'patch',
                                 residual_scale=2.0 if lvvit else 1.0),
                       prune_layers=loc, keep_ratio=0.7, out_type='raw').eval()
    load_weights(model, to_backbone_state_dict(sd))
    images = torch.randn(batch, 3, 224, 224)
    with torch.no_grad():
        tokens = model(images)[0]
    head = split_official(sd)[1]  # the official head keys
    logits = torch.nn.functional.linear(tokens[:, 0], head['head.weight'], head['head.bias'])
    if lvvit:
        aux = torch.nn.functional.linear(tokens[:, 1:], head['aux_head.weight'], head['aux_head.bias'])
        logits = logits + 0.5 * aux.amax(1)
    expected = official_forward(sd, images, num_heads=4, pruning_loc=loc, base_rate=0.7, lvvit=lvvit)
    assert torch.allclose(logits, expected, atol=1e-5), (logits - expected).abs().max()


def test_infer_arch_from_checkpoint():
    assert infer_backbone_kwargs(random_official_state_dict(384, 12)) == (
        dict(arch='deit-small', patch_size=16, img_size=224), [])
    assert infer_backbone_kwargs(random_official_state_dict(384, 16, 3.0, lvvit=True))[0]['arch'] == 'lvvit-s'
    custom, notes = infer_backbone_kwargs(random_official_state_dict(64, 4, 2.0, grid=4))
    assert custom['img_size'] == 64 and custom['arch']['num_layers'] == 4 and custom['arch']['num_heads'] == 1
    assert len(notes) == 1 and 'num_heads=1 was inferred' in notes[0]
    custom, notes = infer_backbone_kwargs(random_official_state_dict(64, 4, 2.0, grid=4), num_heads=2)
    assert custom['arch']['num_heads'] == 2 and notes == []
    # a zoo width with another head count is a custom arch, not the zoo entry
    assert infer_backbone_kwargs(random_official_state_dict(384, 12), num_heads=4)[0]['arch']['num_heads'] == 4


def test_keep_ratio_changes_at_inference_and_one_is_dense():
    model = small_vit(keep_ratio=0.7).eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        kept = [k.shape[1] for k in model.forward_sparse(images).kept_indices]
        model.keep_ratio = 0.5
        assert [k.shape[1] for k in model.forward_sparse(images).kept_indices] == [32, 16, 8]
        model.keep_ratio = 1.0
        dense = model.forward_sparse(images)
    assert kept == [44, 31, 21]
    assert dense.kept_indices == [] and dense.patch_tokens.shape == (2, 64, 64)
    with pytest.raises(ValueError, match='1.3'):
        model.keep_ratio = 1.3


def test_kept_indices_are_absolute_and_nested():
    model = small_vit(keep_ratio=0.6).eval()
    with torch.no_grad():
        result = model.forward_sparse(torch.randn(3, 3, 64, 64))
    for earlier, later in zip(result.kept_indices, result.kept_indices[1:]):
        for b in range(3):
            assert set(later[b].tolist()) <= set(earlier[b].tolist())
            assert len(set(later[b].tolist())) == later.shape[1]


def test_featmap_puts_pruned_tokens_back_in_place():
    model = small_vit(keep_ratio=0.5, out_type='featmap', out_indices=(2, 5)).eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        result = model.forward_sparse(images)
        model.out_type = 'raw'
        raw = model.forward_sparse(images)
    assert [o.shape for o in result.outs] == [(2, 64, 8, 8)] * 2
    final = result.outs[1].flatten(2).transpose(1, 2)  # (B, N, C)
    kept = result.kept_indices[-1]
    for b in range(2):
        # Kept tokens sit at their own positions...
        assert torch.allclose(final[b, kept[b]], raw.outs[1][b, 1:], atol=1e-6)
    # ... and every position has a feature (no zero holes).
    assert final.abs().sum(-1).min() > 0


def test_training_masks_instead_of_dropping():
    torch.manual_seed(0)
    model = small_vit(keep_ratio=0.7, out_type='raw').train()
    images = torch.randn(4, 3, 64, 64)
    result = model.forward_sparse(images)
    assert result.outs[0].shape == (4, 65, 64), 'training keeps every token in the tensor'
    assert len(result.keep_decisions) == 3
    for earlier, later in zip(result.keep_decisions, result.keep_decisions[1:]):
        assert torch.all(later <= earlier)
    # Gradients reach every predictor through the attention masks.
    (result.outs[0][:, 0].sum() + result.keep_decisions[-1].sum()).backward()
    for predictor in model.score_predictors:
        assert predictor.classifier[-1].weight.grad.abs().sum() > 0


def test_other_input_sizes_resize_position_embedding():
    model = small_vit(keep_ratio=0.7, out_type='featmap').eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 96, 64))[0]
    assert out.shape == (1, 64, 12, 8)


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = small_vit(keep_ratio=1.0, drop_path_rate=0.0).train()
    images = torch.randn(2, 3, 64, 64)
    model(images)[0].sum().backward()
    grads = [p.grad.clone() for p in model.blocks.parameters()]
    model.zero_grad()
    model.with_cp = True
    model(images)[0].sum().backward()
    for g, p in zip(grads, model.blocks.parameters()):
        assert torch.allclose(g, p.grad, atol=1e-5)


def test_frozen_stages():
    model = small_vit(frozen_stages=2).train()
    assert not any(p.requires_grad for p in model.patch_embed.parameters())
    assert not any(p.requires_grad for p in model.blocks[1].parameters())
    assert all(p.requires_grad for p in model.blocks[2].parameters())
    assert not model.blocks[0].training


def test_bad_input_raises_clear_errors():
    with pytest.raises(ValueError, match="unknown arch 'deit-huge'"):
        DynamicViT(arch='deit-huge')
    with pytest.raises(ValueError, match='keep_ratio must lie in'):
        DynamicViT(arch='deit-tiny', keep_ratio=0.0)
    with pytest.raises(ValueError, match=r'\[3, 6, 12\]'):
        DynamicViT(arch='deit-tiny', prune_layers=[3, 6, 12])
    with pytest.raises(ValueError, match='strictly increasing'):
        DynamicViT(arch='deit-tiny', prune_layers=[6, 3, 9])
    with pytest.raises(ValueError, match=r"custom DynamicViT arch .* lacks the keys \['num_layers', 'num_heads'\]"):
        DynamicViT(arch=dict(embed_dims=64))
    with pytest.raises(ValueError, match='out_type'):
        DynamicViT(arch='deit-tiny', out_type='tokens')
    model = small_vit()
    with pytest.raises(ValueError, match='60x64 is not a multiple of the patch size 8'):
        model(torch.randn(1, 3, 60, 64))


def test_pretrained_init_from_official_deit_and_mismatch_errors(tmp_path):
    sd = random_official_state_dict(64, 6, predictors=False, grid=8)
    sd['patch_embed.proj.weight'] = sd['patch_embed.proj.weight'][..., :8, :8].contiguous()
    path = tmp_path / 'deit.pth'
    torch.save({'model': sd}, path)
    model = small_vit(init_cfg=dict(type='Pretrained', checkpoint=str(path)))
    predictor_before = model.score_predictors[0].in_proj.weight.clone()
    model.init_weights()
    assert torch.equal(model.blocks[2].mlp.fc1.weight, sd['blocks.2.mlp.fc1.weight'])
    assert not torch.equal(model.score_predictors[0].in_proj.weight, predictor_before), 'predictors get a fresh init'

    broken = dict(sd)
    del broken['blocks.3.attn.qkv.weight']
    broken['dist_token'] = torch.zeros(1, 1, 64)
    torch.save({'model': broken}, path)
    model = small_vit(init_cfg=dict(type='Pretrained', checkpoint=str(path)))
    with pytest.raises(CheckpointMismatchError) as error:
        model.init_weights()
    assert 'blocks.3.attn.qkv.weight' in str(error.value) and 'dist_token' in str(error.value)

    with pytest.raises(CheckpointMismatchError, match="prefix 'backbone.'"):
        small_vit(init_cfg=dict(type='Pretrained', checkpoint=str(path), prefix='backbone')).init_weights()


def test_position_embedding_is_resampled_once_per_size_at_inference():
    model = small_vit(keep_ratio=0.7, out_type='featmap', out_indices=(2, 5)).eval()
    with torch.no_grad():
        first = model.resized_pos_embed((6, 10))
        assert model.resized_pos_embed((6, 10)) is first  # reused for the same grid
        outs = model(torch.randn(1, 3, 48, 80))
        assert [o.shape for o in outs] == [(1, 64, 6, 10)] * 2
        model.pos_embed.add_(0.5)  # new weights (an optimizer step, a loaded checkpoint): resampled again
        assert torch.allclose(model.resized_pos_embed((6, 10)), first + 0.5, atol=1e-5)
    model.train()  # training resamples every pass, so the gradient reaches the embedding
    model(torch.randn(1, 3, 48, 80))[0].sum().backward()
    assert model.pos_embed.grad is not None and model.pos_embed.grad.abs().sum() > 0
