"""DynamicViT in mmdet's Mask R-CNN through ViTDet's simple feature pyramid (one stride-16 map -> strides 4..64)."""
import re
from types import SimpleNamespace

import pytest
import torch
from mmengine.optim import build_optim_wrapper
from mmengine.registry import DefaultScope, MODELS

from sparsevit_mm.engine import KeepRatioLossHook
from sparsevit_mm.layers import num_kept
from sparsevit_mm.models import SimpleFeaturePyramid
from sparsevit_mm.utils.config import read_config

from .helpers import REPO, make_coco, run_tool, run_tool_peak_memory, tiny_coco_data, vit_detection_config

DEIT_S_CONFIG = 'configs/dynamicvit/mask-rcnn_dynamicvit-deit-small-r0.7_simple-fpn_1x_coco.py'
DEIT_B_CONFIG = 'configs/dynamicvit/mask-rcnn_dynamicvit-deit-base-r0.7_simple-fpn_1x_coco.py'
TRAIN_640_PEAK_MIB = 4864  # measured: 3,430 MiB; 6,198 with the direct formula


# ------------------------------------------------------------------------------------------------------- the neck
def test_pyramid_shapes_and_strides_from_one_stride16_map():
    neck = SimpleFeaturePyramid(in_channels=384, out_channels=256, num_outs=5)
    neck.init_weights()
    feature = torch.randn(2, 384, 32, 48)  # a 512x768 image at stride 16
    outs = neck((feature, ))
    assert len(outs) == 5
    image_height, image_width = 32 * 16, 48 * 16
    for out, stride in zip(outs, (4, 8, 16, 32, 64)):
        assert out.shape == (2, 256, image_height // stride, image_width // stride), stride
        assert torch.isfinite(out).all()
    # a bare tensor is the same single map
    assert all(torch.equal(a, b) for a, b in zip(neck(feature), outs))


def test_pyramid_options_and_registration():
    # GroupNorm through mmcv, a subset of the scales, and no norm at all
    neck = SimpleFeaturePyramid(384, 64, scale_factors=(2.0, 1.0), num_outs=3,
                                norm_cfg=dict(type='GN', num_groups=32))
    outs = neck((torch.randn(1, 384, 8, 12),))
    assert [tuple(o.shape) for o in outs] == [(1, 64, 16, 24), (1, 64, 8, 12), (1, 64, 4, 6)]
    assert isinstance(neck.lateral_convs[0].norm, torch.nn.GroupNorm)
    plain = SimpleFeaturePyramid(384, 32, scale_factors=(1.0, 0.5), num_outs=2, norm_cfg=None)
    assert plain.lateral_convs[0].conv.bias is not None  # no norm: the convs keep their bias
    assert [tuple(o.shape) for o in plain(torch.randn(1, 384, 8, 12))] == [(1, 32, 8, 12), (1, 32, 4, 6)]
    # bare type under the mmdet and mmseg scopes; 'LN2d' resolves although only mmpretrain registers that name
    for scope in ('mmdet', 'mmseg'):
        with DefaultScope.overwrite_default_scope(scope):
            built = MODELS.build(dict(type='SimpleFeaturePyramid', in_channels=64, norm_cfg=dict(type='LN2d')))
        assert isinstance(built, SimpleFeaturePyramid)
        assert len(built(torch.randn(1, 64, 4, 4))) == 5


@pytest.mark.parametrize('kwargs,inputs,message', [
    (dict(), (), 'from one .* map, got a tuple of 0'),
    (dict(), (torch.randn(1, 384, 4, 4), torch.randn(1, 384, 4, 4)), r'got a tuple of 2: set the backbone\'s '
                                                                      r'out_indices'),
    (dict(), (torch.randn(1, 192, 4, 4),), r'\(B, 384, H, W\)'),
    (dict(scale_factors=(4.0, 3.0)), None, r'unknown scale factors \[3\.0\].*allowed: \(4\.0, 2\.0, 1\.0, 0\.5\)'),
    (dict(scale_factors=()), None, 'non-empty'),
    (dict(scale_factors=(1.0, 2.0)), None, 'strictly decreasing'),
    (dict(num_outs=3), None, r'num_outs must be an int >= len\(scale_factors\) = 4, got 3'),
    (dict(in_channels=386), None, 'in_channels=386 must be divisible by 4'),
    (dict(out_channels=0), None, 'out_channels must be a positive int, got 0'),
    (dict(norm_cfg=dict(eps=1e-6)), None, "norm_cfg must be None or a dict with a 'type'"),
])
def test_pyramid_errors_name_the_bad_value(kwargs, inputs, message):
    kwargs = dict(dict(in_channels=384), **kwargs)
    with pytest.raises(ValueError, match=message):
        neck = SimpleFeaturePyramid(**kwargs)
        neck(inputs)


# ------------------------------------------------------------------------------------- the shipped Mask R-CNN config
def shipped_config(path):
    cfg = read_config(path)
    cfg.model.backbone.init_cfg = None  # no weights file here
    return cfg


def test_deit_base_config_pairs_backbone_and_neck_widths():
    cfg = shipped_config(DEIT_B_CONFIG)
    assert cfg.model.backbone.arch == 'deit-base' and cfg.model.neck.in_channels == 768
    assert cfg.model.backbone.drop_path_rate == 0.2
    with DefaultScope.overwrite_default_scope('mmdet'):
        backbone = MODELS.build(cfg.model.backbone)
    assert backbone.embed_dims == 768


def test_deit_small_mask_rcnn_trains_one_step_and_predicts_at_keep_07():
    from mmdet.testing import demo_mm_inputs
    cfg = shipped_config(DEIT_S_CONFIG)
    assert cfg.model.data_preprocessor.pad_size_divisor == 32
    assert cfg.model.rpn_head.anchor_generator.strides == [4, 8, 16, 32, 64]
    with DefaultScope.overwrite_default_scope('mmdet'):
        model = MODELS.build(cfg.model)
        optim_wrapper = build_optim_wrapper(model, cfg.optim_wrapper)
    # the embeddings are in parameter groups without weight decay, everything else has 0.1
    decay = {id(group['params'][0]): group['weight_decay'] for group in optim_wrapper.optimizer.param_groups}
    assert decay[id(model.backbone.pos_embed)] == 0.0 and decay[id(model.backbone.cls_token)] == 0.0
    assert decay[id(model.backbone.blocks[0].attn.qkv.weight)] == pytest.approx(0.1)
    model.init_weights()
    model.train()
    KeepRatioLossHook().before_train(SimpleNamespace(model=model))
    data = demo_mm_inputs(batch_size=1, image_shapes=[(3, 224, 320)], num_items=[3], num_classes=80, with_mask=True)
    with DefaultScope.overwrite_default_scope('mmdet'):
        log_vars = model.train_step(data, optim_wrapper)
    for key in ('loss_rpn_cls', 'loss_rpn_bbox', 'loss_cls', 'loss_bbox', 'loss_mask', 'loss_keep_ratio',
                'keep_ratio_stage1', 'keep_ratio_stage3', 'loss'):
        assert key in log_vars and torch.isfinite(log_vars[key]), key

    model.eval()
    assert model.backbone.keep_ratio == 0.7
    with torch.no_grad(), DefaultScope.overwrite_default_scope('mmdet'):
        inputs = model.data_preprocessor(data, False)['inputs']
        sparse = model.backbone.forward_sparse(inputs)
        predictions = model.test_step(data)
    # inference really drops tokens (14 x 20 patches): 0.7, 0.49, 0.343 of them stay
    num_patches = (224 // 16) * (320 // 16)
    assert [k.shape[1] for k in sparse.kept_indices] == [num_kept(num_patches, 0.7 ** s) for s in (1, 2, 3)]
    assert sparse.outs[0].shape == (1, 384, 14, 20)
    instances = predictions[0].pred_instances
    assert instances.bboxes.shape[-1] == 4 and len(instances.masks) == len(instances.bboxes)
    assert torch.isfinite(instances.bboxes).all()


# ------------------------------------------------------------------------------------------------ tools end to end
@pytest.mark.slow
def test_tools_train_and_test_dynamicvit_mask_rcnn_on_a_tiny_coco(tmp_path):
    coco = make_coco(tmp_path / 'coco')
    config = tmp_path / 'mask_rcnn_dynamicvit.py'
    config.write_text(vit_detection_config(coco, tmp_path / 'work'))
    out = run_tool('tools/train.py', config)
    assert 'loss_keep_ratio' in out.stdout + out.stderr, 'the keep-ratio loss must reach the training log'
    out = run_tool('tools/test.py', config, tmp_path / 'work' / 'iter_4.pth')
    text = out.stdout + out.stderr
    assert re.search(r'coco/bbox_mAP: [\d.]+', text) and re.search(r'coco/segm_mAP: [\d.]+', text)


@pytest.mark.slow
def test_tools_train_the_shipped_deit_small_mask_rcnn_at_640_in_bounded_memory(tmp_path):
    """One iteration of the shipped config (DeiT-S, batch 2) at 640 x 640 (1,601 tokens): the direct keep-policy
    formula held about 1.4 GiB of (B, H, N, N) tensors per image here (the run peaked at 6.2 GiB, 3.4 now)."""
    coco = make_coco(tmp_path / 'coco', num_images=2, size=(640, 640))
    config = tmp_path / 'mask_rcnn_640.py'
    config.write_text(f"_base_ = [{str(REPO / DEIT_S_CONFIG)!r}]\n"
                      "model = dict(backbone=dict(init_cfg=None))  # no weights file here\n"
                      + tiny_coco_data(coco, tmp_path / 'work', max_iters=1, scale=(640, 640), validate=False))
    out, peak_mib = run_tool_peak_memory('tools/train.py', config)
    text = out.stdout + out.stderr
    assert re.search(r'loss_keep_ratio: [\d.]+', text) and 'loss_mask' in text
    assert peak_mib < TRAIN_640_PEAK_MIB, f'tools/train.py peaked at {peak_mib:.0f} MiB'
