"""The DynamicViT objective as an mmpretrain classifier, and mmpretrain's own DeiT config with our backbone."""
import pytest
import torch
from mmengine.registry import DefaultScope
from mmpretrain.registry import MODELS
from mmpretrain.structures import DataSample

from sparsevit_mm.models import TokenLabelingClsHead
from sparsevit_mm.utils.config import read_config

from .helpers import TINY_ARCH, save_tiny_teacher


def tiny_backbone(**kwargs):
    return dict(type='DynamicViT', arch=TINY_ARCH, img_size=32, patch_size=8, prune_layers=[1, 2, 3], **kwargs)


def samples(labels):
    return [DataSample().set_gt_label(int(y)) for y in labels]


def build(**kwargs):
    with DefaultScope.overwrite_default_scope('mmpretrain'):
        model = MODELS.build(dict(type='DynamicViTClassifier', backbone=tiny_backbone(keep_ratio=0.7),
                                  head=dict(type='VisionTransformerClsHead', num_classes=2, in_channels=64),
                                  **kwargs))
    model.init_weights()
    return model


def test_objective_terms_with_a_teacher(tmp_path):
    ckpt = save_tiny_teacher(tmp_path / 'teacher.pth')
    teacher = dict(model=dict(type='ImageClassifier', backbone=tiny_backbone(keep_ratio=1.0),
                              head=dict(type='VisionTransformerClsHead', num_classes=2, in_channels=64)),
                   checkpoint=str(ckpt))
    model = build(teacher=teacher)
    assert 'teacher' not in dict(model.named_children()), 'teacher weights must stay out of the student'
    assert not any(k.startswith('teacher') for k in model.state_dict())
    losses = model.loss(torch.randn(4, 3, 32, 32), samples([0, 1, 0, 1]))
    for key in ('loss_cls', 'loss_keep_ratio', 'loss_distill_logits', 'loss_distill_tokens',
                'keep_ratio_stage1', 'keep_ratio_stage3'):
        assert key in losses and torch.isfinite(losses[key])
    total = sum(v for k, v in losses.items() if 'loss' in k)
    total.backward()
    assert model.backbone.score_predictors[0].classifier[0].weight.grad.abs().sum() > 0
    # The teacher got its checkpoint.
    saved = torch.load(ckpt)['state_dict']
    assert torch.equal(model.teacher.model.backbone.blocks[0].attn.qkv.weight.cpu(),
                       saved['backbone.blocks.0.attn.qkv.weight'])


def test_keep_ratio_loss_matches_definition():
    model = build(keep_ratio_weight=2.0)
    torch.manual_seed(3)
    inputs = torch.randn(4, 3, 32, 32)
    torch.manual_seed(5)
    losses = model.loss(inputs, samples([0, 1, 0, 1]))
    torch.manual_seed(5)
    decisions = model.backbone.forward_sparse(inputs).keep_decisions
    expected = 2.0 * sum(((d.mean(1) - r) ** 2).mean() for d, r in zip(decisions, [0.7, 0.49, 0.343])) / 3
    assert losses['loss_keep_ratio'].item() == pytest.approx(expected.item(), rel=1e-5)


def test_keep_ratio_one_has_no_pruning_terms():
    model = build()
    model.backbone.keep_ratio = 1.0
    losses = model.loss(torch.randn(2, 3, 32, 32), samples([0, 1]))
    assert set(losses) == {'loss_cls'}


def test_token_labeling_head_and_kl_distillation(tmp_path):
    head = TokenLabelingClsHead(num_classes=3, in_channels=64)
    tokens = torch.randn(2, 5, 64)
    expected = head.cls_fc(tokens[:, 0]) + 0.5 * head.token_fc(tokens[:, 1:]).amax(1)
    assert torch.allclose(head((tokens, )), expected)
    with pytest.raises(ValueError, match='out_type="raw"'):
        head((tokens[:, 0], ))

    lv_head = dict(type='TokenLabelingClsHead', num_classes=2, in_channels=64)
    teacher_model = dict(type='ImageClassifier', backbone=tiny_backbone(keep_ratio=1.0, out_type='raw'),
                         head=lv_head)
    with DefaultScope.overwrite_default_scope('mmpretrain'):
        model = MODELS.build(dict(type='DynamicViTClassifier', backbone=tiny_backbone(keep_ratio=0.7, out_type='raw'),
                                  head=lv_head, token_distill='kl', teacher=dict(model=teacher_model)))
    model.init_weights()
    losses = model.loss(torch.randn(2, 3, 32, 32), samples([0, 1]))
    assert torch.isfinite(losses['loss_distill_tokens']) and losses['loss_distill_tokens'] >= 0


def test_teacher_from_an_mmpretrain_config_file():
    """The teacher can be any mmpretrain config: here mmpretrain's own DeiT-S, tokens read from `backbone.ln1`."""
    with DefaultScope.overwrite_default_scope('mmpretrain'):
        model = MODELS.build(dict(
            type='DynamicViTClassifier',
            backbone=dict(type='DynamicViT', arch='deit-small', keep_ratio=0.7),
            head=dict(type='VisionTransformerClsHead', num_classes=1000, in_channels=384),
            teacher=dict(config='mmpretrain::deit/deit-small_4xb256_in1k.py')))
    model.init_weights()
    losses = model.loss(torch.randn(1, 3, 224, 224), samples([3]))
    assert torch.isfinite(losses['loss_distill_tokens'])


def test_mmpretrain_deit_config_with_only_the_backbone_swapped_trains_a_step():
    cfg = read_config('mmpretrain::deit/deit-small_4xb256_in1k.py')
    cfg.model.backbone = dict(type='DynamicViT', arch='deit-small', keep_ratio=0.7)
    cfg.model.setdefault('data_preprocessor', cfg.data_preprocessor)  # as the Runner does
    with DefaultScope.overwrite_default_scope('mmpretrain'):
        model = MODELS.build(cfg.model)
        from mmengine.optim import build_optim_wrapper
        optim_wrapper = build_optim_wrapper(model, cfg.optim_wrapper)
    model.init_weights()
    model.train()
    data = dict(inputs=[torch.randint(0, 255, (3, 224, 224), dtype=torch.uint8) for _ in range(2)],
                data_samples=samples([1, 7]))
    before = model.backbone.blocks[5].mlp.fc1.weight.clone()
    log_vars = model.train_step(data, optim_wrapper)
    assert torch.isfinite(log_vars['loss'])
    assert not torch.equal(before, model.backbone.blocks[5].mlp.fc1.weight)


def test_classifier_rejects_a_dense_backbone():
    with DefaultScope.overwrite_default_scope('mmpretrain'), pytest.raises(TypeError, match='token-sparse'):
        MODELS.build(dict(type='DynamicViTClassifier', backbone=dict(type='ResNet', depth=18),
                          head=dict(type='LinearClsHead', num_classes=2, in_channels=512)))
