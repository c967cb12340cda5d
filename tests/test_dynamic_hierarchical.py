"""DynamicSwinTransformer and DynamicConvNeXt: dense equivalence, official checkpoints, routing, bad input."""
import pytest
import torch
from mmdet.models.backbones import SwinTransformer
from mmpretrain.models.backbones import ConvNeXt

from sparsevit_mm.layers import default_prune_layers
from sparsevit_mm.models import DynamicConvNeXt, DynamicSwinTransformer
from sparsevit_mm.models.backbones.dynamic_convnext import (DynamicConvNeXtBlock, convnext_to_backbone,
                                                            infer_convnext_kwargs)
from sparsevit_mm.models.backbones.dynamic_swin import DynamicSwinBlock, infer_swin_kwargs, swin_to_backbone
from sparsevit_mm.utils import CheckpointMismatchError, load_weights

from .reference.official_hierarchical import (official_convnext_forward, official_swin_forward,
                                              random_official_convnext, random_official_swin)

SMALL_SWIN = dict(embed_dims=32, depths=[1, 1, 4, 1], num_heads=[1, 2, 4, 8])
SMALL_CONVNEXT = dict(depths=[1, 1, 4, 1], channels=[16, 32, 64, 128])


def compare(a, b):
    return max((x - y).abs().max().item() for x, y in zip(a, b))


@pytest.mark.parametrize('shape', [(224, 224), (200, 300)])
def test_swin_keep_ratio_one_equals_mmdet_swin(shape):
    reference = SwinTransformer(embed_dims=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), drop_path_rate=0.0)
    reference.init_weights()
    reference.eval()
    model = DynamicSwinTransformer(arch='tiny', keep_ratio=1.0, drop_path_rate=0.0)
    load_weights(model, reference.state_dict())
    model.eval()
    images = torch.randn(2, 3, *shape)
    with torch.no_grad():
        assert compare(model(images), reference(images)) < 1e-5


@pytest.mark.parametrize('shape', [(224, 224), (200, 300)])
def test_convnext_keep_ratio_one_equals_mmpretrain_convnext(shape):
    kwargs = dict(arch='tiny', out_indices=(0, 1, 2, 3), gap_before_final_norm=False)
    reference = ConvNeXt(**kwargs)
    reference.init_weights()
    reference.eval()
    model = DynamicConvNeXt(keep_ratio=1.0, **kwargs)
    load_weights(model, reference.state_dict())
    model.eval()
    images = torch.randn(2, 3, *shape)
    with torch.no_grad():
        assert compare(model(images), reference(images)) < 1e-5


@pytest.mark.parametrize('keep_ratio', [1.0, 0.7])
def test_feature_maps_are_contiguous_channels_first(keep_ratio):
    """DynamicConvNeXt computes channels-last inside; FPN / UperNet still get ordinary contiguous (B, C, H, W)."""
    model = DynamicConvNeXt(arch=SMALL_CONVNEXT, keep_ratio=keep_ratio, out_indices=(0, 1, 2, 3),
                            gap_before_final_norm=False)
    model.init_weights()
    model.eval()
    with torch.no_grad():
        outs = model(torch.randn(2, 3, 96, 128))
    assert [tuple(o.shape) for o in outs] == [(2, 16, 24, 32), (2, 32, 12, 16), (2, 64, 6, 8), (2, 128, 3, 4)]
    assert all(o.is_contiguous() for o in outs)


@pytest.mark.parametrize('batch', [1, 2, 3])  # the official DynamicSwin crashes at batch 2 in eval; we must not
@pytest.mark.parametrize('rate', [0.7, 0.9])
def test_official_dynamic_swin_checkpoint_reproduces_official_outputs(batch, rate):
    sd = random_official_swin(**SMALL_SWIN, num_classes=5)
    model = DynamicSwinTransformer(arch=SMALL_SWIN, keep_ratio=rate, prune_layers=[1, 2, 3], out_indices=(3, ),
                                   drop_path_rate=0.0, pad_small_map=False)
    load_weights(model, swin_to_backbone(sd, model.out_indices))
    model.eval()
    images = torch.randn(batch, 3, 224, 224)
    with torch.no_grad():
        result = model.forward_sparse(images)
    logits = torch.nn.functional.linear(result.outs[0].mean((2, 3)), sd['head.weight'], sd['head.bias'])
    expected = official_swin_forward(sd, images, SMALL_SWIN['depths'], SMALL_SWIN['num_heads'], base_rate=rate)
    assert torch.allclose(logits, expected, atol=1e-5), (logits - expected).abs().max()
    assert [k.shape[1] for k in result.kept_indices] == ([137, 97, 58] if rate == 0.7 else [176, 137, 98])


@pytest.mark.parametrize('batch', [1, 2])
def test_official_dynamic_cnn_checkpoint_reproduces_official_outputs(batch):
    sd = random_official_convnext(**SMALL_CONVNEXT, num_classes=5)
    model = DynamicConvNeXt(arch=SMALL_CONVNEXT, keep_ratio=0.7, prune_layers=[1, 2, 3])
    load_weights(model, convnext_to_backbone(sd, model.out_indices))
    model.eval()
    images = torch.randn(batch, 3, 224, 224)
    with torch.no_grad():
        features = model(images)[0]
    logits = torch.nn.functional.linear(features, sd['head.weight'], sd['head.bias'])
    expected = official_convnext_forward(sd, images, SMALL_CONVNEXT['depths'], base_rate=0.7)
    assert torch.allclose(logits, expected, atol=1e-5), (logits - expected).abs().max()


@pytest.mark.parametrize('cls,arch', [(DynamicSwinTransformer, 'tiny'), (DynamicConvNeXt, 'tiny')])
def test_training_mixes_paths_and_reaches_the_predictors(cls, arch):
    model = cls(arch=arch, keep_ratio=0.7, out_indices=(0, 1, 2, 3), drop_path_rate=0.0,
                **({'gap_before_final_norm': False} if cls is DynamicConvNeXt else {}))
    model.init_weights()
    model.train()
    result = model.forward_sparse(torch.randn(2, 3, 224, 224))
    assert [tuple(o.shape[-2:]) for o in result.outs] == [(56, 56), (28, 28), (14, 14), (7, 7)]
    assert len(result.keep_decisions) == 3 and result.keep_decisions[0].shape == (2, 196)
    loss = sum(o.mean() for o in result.outs) + sum(d.mean() for d in result.keep_decisions)
    loss.backward()
    for predictor in model.score_predictors:
        assert predictor.classifier[-1].weight.grad.abs().sum() > 0
    assert model.pending_keep_decisions is None, 'only forward() leaves decisions for the loss hook'
    model(torch.randn(1, 3, 224, 224))
    assert len(model.pop_keep_decisions()) == 3 and model.pending_keep_decisions is None


@pytest.mark.parametrize('cls', [DynamicSwinTransformer, DynamicConvNeXt])
def test_inference_uses_fast_path_on_the_rest(cls):
    """Every position of a routed block gets an update: its slow path takes the predictor's best positions and its
    fast path every other one (none is left untouched), and on the same image the result differs from dense."""
    model = cls(arch='tiny', keep_ratio=0.5)
    model.init_weights()
    model.eval()
    images = torch.randn(1, 3, 224, 224)
    rows = {}  # block -> [slow-path rows, fast-path rows]

    def counter(block, path):
        def hook(module, args, output):
            rows.setdefault(block, [0, 0])[path] += args[0].reshape(-1, args[0].shape[-1]).shape[0]
        return hook

    blocks = [b for b in model.modules() if isinstance(b, (DynamicSwinBlock, DynamicConvNeXtBlock))
              and getattr(b, 'fast_path', None) is not None]
    handles = []
    for block in blocks:
        handles.append(block.get_submodule(block.slow_path_modules[-1]).register_forward_hook(counter(block, 0)))
        handles.append(block.fast_path.register_forward_hook(counter(block, 1)))
    with torch.no_grad():
        sparse = model.forward_sparse(images)
        for handle in handles:
            handle.remove()
        model.keep_ratio = 1.0
        dense = model.forward_sparse(images)
    assert [k.shape[1] for k in sparse.kept_indices] == [98, 58, 19]  # of the 14 x 14 stage-3 positions
    routed = {block: counts for block, counts in rows.items() if counts[1] > 0}
    assert len(routed) >= len(sparse.kept_indices)
    assert all(slow + fast == 14 * 14 for slow, fast in routed.values())
    assert sorted({slow for slow, _ in routed.values()}) == [19, 58, 98]
    assert dense.kept_indices == [] and all(torch.isfinite(o).all() for o in sparse.outs)
    # same image: routing changed the result (slightly for ConvNeXt, whose fresh layer scales are 1e-6)
    assert not torch.equal(sparse.outs[-1], dense.outs[-1])


def test_pretrained_from_dense_official_checkpoints_and_errors(tmp_path):
    sd = random_official_swin(**SMALL_SWIN, predictors=False)
    torch.save({'model': sd}, tmp_path / 'swin.pth')
    model = DynamicSwinTransformer(arch=SMALL_SWIN, init_cfg=dict(type='Pretrained', checkpoint=str(tmp_path / 'swin.pth')))
    model.init_weights()
    assert torch.equal(model.stages[2].blocks[3].attn.w_msa.qkv.weight, sd['layers.2.blocks.3.attn.qkv.weight'])
    assert torch.equal(model.norm3.weight, sd['norm.weight'])

    sd = random_official_convnext(**SMALL_CONVNEXT, predictors=False)
    del sd['stages.1.0.pwconv1.weight']
    torch.save({'model': sd}, tmp_path / 'convnext.pth')
    model = DynamicConvNeXt(arch=SMALL_CONVNEXT, init_cfg=dict(type='Pretrained', checkpoint=str(tmp_path / 'convnext.pth')))
    with pytest.raises(CheckpointMismatchError, match=r'stages\.1\.0\.pointwise_conv1\.weight'):
        model.init_weights()


def test_one_initialisation_rule(tmp_path):
    """Every model of ours initialises alike (CheckpointLayoutMixin.init_weights): the family's own init, init_cfg's
    other initialisers over it, the children's own init_weights, then a Pretrained checkpoint, whatever it lacks
    keeping what came before."""
    torch.save({'model': random_official_swin(**SMALL_SWIN, predictors=False)}, tmp_path / 'swin.pth')
    init_cfg = [dict(type='Constant', layer='Linear', val=0.25, bias=0.),
                dict(type='Pretrained', checkpoint=str(tmp_path / 'swin.pth'))]
    model = DynamicSwinTransformer(arch=SMALL_SWIN, init_cfg=init_cfg)
    model.init_weights()
    sd = torch.load(tmp_path / 'swin.pth')['model']
    assert torch.equal(model.stages[2].blocks[3].attn.w_msa.qkv.weight, sd['layers.2.blocks.3.attn.qkv.weight'])
    assert (model.score_predictors[0].in_proj.weight == 0.25).all()  # not in the checkpoint: the user's init
    assert (model.score_predictors[0].in_proj.bias == 0).all()
    scratch = DynamicSwinTransformer(arch=SMALL_SWIN)
    scratch.init_weights()
    table = scratch.stages[0].blocks[0].attn.w_msa.relative_position_bias_table
    assert 0.01 < table.std() < 0.03, 'the attention modules\' own init_weights ran (truncated normal, std 0.02)'
    assert abs(scratch.stages[2].blocks[1].ffn.layers[0][0].weight.std() - 0.02) < 0.005  # the family's init
    assert scratch.is_init and model.is_init


def test_mmdet_style_checkpoint_with_prefix(tmp_path):
    dense = DynamicSwinTransformer(arch=SMALL_SWIN, keep_ratio=1.0)
    state = {f'backbone.{k}': v for k, v in dense.state_dict().items() if 'fast_path' not in k
             and 'score_predictors' not in k}
    state['neck.lateral_convs.0.conv.weight'] = torch.zeros(1)
    torch.save({'state_dict': state}, tmp_path / 'mask_rcnn.pth')
    model = DynamicSwinTransformer(arch=SMALL_SWIN, init_cfg=dict(type='Pretrained', prefix='backbone.',
                                                                  checkpoint=str(tmp_path / 'mask_rcnn.pth')))
    model.init_weights()
    assert torch.equal(model.stages[0].blocks[0].ffn.layers[1].weight, dense.stages[0].blocks[0].ffn.layers[1].weight)


@pytest.mark.parametrize('cls', [DynamicSwinTransformer, DynamicConvNeXt])
def test_bad_input_raises_clear_errors(cls):
    with pytest.raises(ValueError, match=r'\[0.7, 0.8, 0.5\]'):
        cls(arch='tiny', keep_ratio=[0.7, 0.8, 0.5])
    with pytest.raises(ValueError, match='keep_ratio must lie in'):
        cls(arch='tiny', keep_ratio=1.2)
    with pytest.raises(ValueError, match=r'keep_ratio=0.3 .* smallest allowed is 0.40'):
        cls(arch='tiny', keep_ratio=0.3)  # 0.3 / 0.1 / -0.1: the last stage would keep nothing
    with pytest.raises(ValueError, match=r'prune_layers \[1, 2, 9\]: \[9\] out of range'):
        cls(arch='tiny', prune_layers=[1, 2, 9])
    with pytest.raises(ValueError, match="unknown arch 'gigantic'"):
        cls(arch='gigantic')
    model = cls(arch='tiny')
    with pytest.raises(ValueError, match='smaller than'):
        model(torch.randn(1, 3, 24, 64))


@pytest.mark.parametrize('family', ['swin', 'convnext'])
def test_convert_official_dynamic_checkpoint_to_a_classifier(family):
    from sparsevit_mm.apis import build_model, convert_official
    if family == 'swin':
        sd = random_official_swin(**SMALL_SWIN, num_classes=5)
        expected_fn = lambda x: official_swin_forward(sd, x, SMALL_SWIN['depths'], SMALL_SWIN['num_heads'])  # noqa
    else:
        sd = random_official_convnext(**SMALL_CONVNEXT, num_classes=5)
        expected_fn = lambda x: official_convnext_forward(sd, x, SMALL_CONVNEXT['depths'])  # noqa
    converted, model_cfg, notes = convert_official(sd)
    backbone, head = model_cfg['backbone'], model_cfg['head']
    assert backbone['prune_layers'] == [1, 2, 3] and head == dict(type='LinearClsHead', num_classes=5,
                                                                   in_channels=256 if family == 'swin' else 128)
    assert backbone['keep_ratio'] == 0.7 and notes == []  # official dynamic checkpoints are trained at 0.7
    assert (model_cfg.get('neck') == dict(type='GlobalAveragePooling')) == (family == 'swin')
    model = build_model(model_cfg)
    model.load_state_dict(converted)
    model.eval()
    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(model(images), expected_fn(images), atol=1e-5)


@pytest.mark.parametrize('family', ['swin', 'convnext'])
def test_dynamic_objective_with_hierarchical_backbones(family, tmp_path):
    """Classification objective of the T-PAMI recipe: keep-ratio terms and feature distillation on every position."""
    from mmengine.registry import DefaultScope
    from mmpretrain.registry import MODELS
    from mmpretrain.structures import DataSample
    if family == 'swin':
        backbone = dict(type='DynamicSwinTransformer', arch=SMALL_SWIN, prune_layers=[1, 2, 3], out_indices=(3, ),
                        pad_small_map=False)
        neck, width = dict(type='GlobalAveragePooling'), 256
    else:
        backbone, neck, width = dict(type='DynamicConvNeXt', arch=SMALL_CONVNEXT, prune_layers=[1, 2, 3]), None, 128
    head = dict(type='LinearClsHead', num_classes=3, in_channels=width)
    teacher = dict(model=dict(type='ImageClassifier', backbone=dict(backbone, keep_ratio=1.0), neck=neck, head=head))
    with DefaultScope.overwrite_default_scope('mmpretrain'):
        model = MODELS.build(dict(type='DynamicViTClassifier', backbone=dict(backbone, keep_ratio=0.7), neck=neck,
                                  head=head, teacher=teacher, keep_ratio_weight=10.0))
    model.init_weights()
    losses = model.loss(torch.randn(2, 3, 224, 224), [DataSample().set_gt_label(y) for y in (0, 2)])
    assert {'loss_cls', 'loss_keep_ratio', 'loss_distill_logits', 'loss_distill_tokens'} <= set(losses)
    sum(v for k, v in losses.items() if k.startswith('loss')).backward()
    assert model.backbone.score_predictors[1].in_proj.weight.grad.abs().sum() > 0


def test_upstream_arguments_are_taken_or_refused_clearly():
    """mmdet's / mmseg's Swin and mmpretrain's ConvNeXt arguments: those with a meaning here work, the rest raise."""
    swin_args = dict(embed_dims=32, depths=[2, 2, 6, 2], num_heads=[1, 2, 4, 8], qk_scale=None, patch_norm=True,
                     pretrain_img_size=224, strides=(4, 2, 2, 2), convert_weights=True, drop_path_rate=0.0)
    images = torch.randn(1, 3, 96, 128)
    for ours, upstream in ((DynamicSwinTransformer(keep_ratio=1.0, **swin_args), SwinTransformer(**swin_args)),
                           (DynamicConvNeXt(arch='atto', keep_ratio=1.0, out_indices=(0, 1, 2, 3),
                                            gap_before_final_norm=False, stem_patch_size=4),
                            ConvNeXt(arch='atto', out_indices=(0, 1, 2, 3), gap_before_final_norm=False))):
        ours.load_state_dict(upstream.state_dict(), strict=False)
        ours.eval(), upstream.eval()
        with torch.no_grad():
            for a, b in zip(ours(images), upstream(images)):
                assert torch.allclose(a, b, atol=1e-5)
    assert DynamicSwinTransformer(embed_dims=96, depths=[2, 2, 18, 2]).prune_layers == [2, 4, 6]  # the zoo's S
    assert DynamicConvNeXt(arch='atto').prune_layers == [1, 2, 3]
    with pytest.raises(ValueError, match='use_abs_pos_embed=True is not supported'):
        DynamicSwinTransformer(use_abs_pos_embed=True)
    with pytest.raises(ValueError, match="give arch='small' or \\['embed_dims'\\]"):
        DynamicSwinTransformer(arch='small', embed_dims=96)
    with pytest.raises(TypeError, match="unexpected keyword argument 'window'"):
        DynamicSwinTransformer(window=7)
    with pytest.raises(ValueError, match='use_grn=True'):
        DynamicConvNeXt(use_grn=True)
    with pytest.raises(ValueError, match='linear_pw_conv=False'):
        DynamicConvNeXt(linear_pw_conv=False)
    with pytest.raises(ValueError, match="norm_cfg must be dict\\(type='LN2d'"):
        DynamicConvNeXt(norm_cfg=dict(type='BN'))


def test_predictor_positions_of_a_width_outside_the_table_follow_one_rule():
    """A dense checkpoint of an unlisted Swin / ConvNeXt width gets the predictors a config would give it: the
    official spacing by depth (6 -> 1, 2, 3; 18 -> 2, 4, 6; 27 -> 3, 6, 9), not another rule."""
    depths = [2, 2, 18, 2]
    swin = {'patch_embed.proj.weight': torch.zeros(40, 3, 4, 4)}
    for stage, depth in enumerate(depths):
        for block in range(depth):
            swin[f'layers.{stage}.blocks.{block}.attn.relative_position_bias_table'] = torch.zeros(169, 2 ** stage)
    kwargs = infer_swin_kwargs(swin)
    assert kwargs['arch']['embed_dims'] == 40
    built = DynamicSwinTransformer(**kwargs)
    assert built.prune_layers == default_prune_layers(18) == [2, 4, 6]
    assert built.prune_layers == DynamicSwinTransformer(arch=kwargs['arch']).prune_layers
    convnext = {f'stages.{stage}.{block}.gamma': torch.zeros(24 * 2 ** stage)
                for stage, depth in enumerate([3, 3, 27, 3]) for block in range(depth)}
    built = DynamicConvNeXt(**infer_convnext_kwargs(convnext))
    assert built.prune_layers == default_prune_layers(27) == [3, 6, 9]
