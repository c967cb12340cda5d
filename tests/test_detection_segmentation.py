"""Dynamic Swin / ConvNeXt inside mmdet and mmseg: upstream configs with the backbone swapped, and our tools."""
import re
from types import SimpleNamespace

import pytest
import torch
from mmengine.model import revert_sync_batchnorm
from mmengine.optim import build_optim_wrapper
from mmengine.registry import DefaultScope, MODELS

from sparsevit_mm.engine import KeepRatioLossHook
from sparsevit_mm.utils.config import read_config

from .helpers import detection_config, make_ade, make_coco, run_tool, segmentation_config


def swapped(config, backbone_type):
    """An upstream config whose backbone changes by ``type=`` alone (the pretrained file is left out: no download)."""
    cfg = read_config(config)
    cfg.model.backbone.type = backbone_type  # the one change; every upstream argument stays
    cfg.model.backbone.init_cfg = None
    cfg.model.setdefault('data_preprocessor', cfg.get('data_preprocessor'))
    cfg.optim_wrapper = dict(type='OptimWrapper', optimizer=dict(type='AdamW', lr=1e-4))  # the recipes' AMP needs a GPU
    return cfg


def train_one_step(cfg, scope, data):
    with DefaultScope.overwrite_default_scope(scope):
        model = revert_sync_batchnorm(MODELS.build(cfg.model))  # as the Runner does outside DDP
        optim_wrapper = build_optim_wrapper(model, cfg.optim_wrapper)
    model.init_weights()
    model.train()
    KeepRatioLossHook().before_train(SimpleNamespace(model=model))
    with DefaultScope.overwrite_default_scope(scope):
        return model.train_step(data, optim_wrapper)


UPSTREAM = {  # (mmdet config, mmseg config, our type)
    'swin': ('mmdet::swin/mask-rcnn_swin-t-p4-w7_fpn_1x_coco.py',
             'mmseg::swin/swin-tiny-patch4-window7-in1k-pre_upernet_8xb2-160k_ade20k-512x512.py',
             'DynamicSwinTransformer'),
    'convnext': ('mmdet::convnext/mask-rcnn_convnext-t-p4-w7_fpn_amp-ms-crop-3x_coco.py',
                 'mmseg::convnext/convnext-tiny_upernet_8xb2-amp-160k_ade20k-512x512.py', 'DynamicConvNeXt'),
}


@pytest.mark.parametrize('kind', ['swin', 'convnext'])
def test_mmdet_mask_rcnn_config_with_only_the_backbone_type_changed(kind):
    from mmdet.testing import demo_mm_inputs
    detection, _, backbone_type = UPSTREAM[kind]
    cfg = swapped(detection, backbone_type)
    data = demo_mm_inputs(batch_size=1, image_shapes=[(3, 160, 224)], num_items=[3], num_classes=80, with_mask=True)
    log_vars = train_one_step(cfg, 'mmdet', data)
    for key in ('loss_rpn_cls', 'loss_bbox', 'loss_mask', 'loss_keep_ratio', 'keep_ratio_stage3'):
        assert key in log_vars and torch.isfinite(log_vars[key]), key


@pytest.mark.parametrize('kind', ['swin', 'convnext'])
def test_mmseg_upernet_config_with_only_the_backbone_type_changed(kind):
    from mmseg.structures import SegDataSample
    from mmengine.structures import PixelData
    _, segmentation, backbone_type = UPSTREAM[kind]
    cfg = swapped(segmentation, backbone_type)
    cfg.model.data_preprocessor.size = (128, 128)
    samples = []
    for _ in range(2):  # UperNet's pooling module has BatchNorm on 1x1 maps: it needs more than one image
        sample = SegDataSample(gt_sem_seg=PixelData(data=torch.randint(0, 150, (1, 128, 128))))
        sample.set_metainfo(dict(img_shape=(128, 128), ori_shape=(128, 128), pad_shape=(128, 128)))
        samples.append(sample)
    data = dict(inputs=[torch.randint(0, 255, (3, 128, 128), dtype=torch.uint8) for _ in samples],
                data_samples=samples)
    log_vars = train_one_step(cfg, 'mmseg', data)
    for key in ('decode.loss_ce', 'aux.loss_ce', 'loss_keep_ratio'):
        assert key in log_vars and torch.isfinite(log_vars[key]), key


@pytest.fixture(scope='module')
def coco(tmp_path_factory):
    return make_coco(tmp_path_factory.mktemp('coco'))


@pytest.mark.slow
@pytest.mark.parametrize('kind', ['swin', 'convnext'])
def test_tools_train_and_test_mask_rcnn_on_a_tiny_coco(coco, tmp_path, kind):
    config = tmp_path / f'mask_rcnn_{kind}.py'
    config.write_text(detection_config(kind, coco, tmp_path / 'work'))
    out = run_tool('tools/train.py', config)
    assert 'loss_keep_ratio' in out.stdout + out.stderr, 'the keep-ratio loss must reach the training log'
    out = run_tool('tools/test.py', config, tmp_path / 'work' / 'iter_4.pth')
    text = out.stdout + out.stderr
    assert re.search(r'coco/bbox_mAP: [\d.]+', text) and re.search(r'coco/segm_mAP: [\d.]+', text)


@pytest.mark.slow
def test_tools_train_and_test_upernet_on_a_tiny_ade(tmp_path):
    data = make_ade(tmp_path / 'ade')
    config = tmp_path / 'upernet.py'
    config.write_text(segmentation_config('swin', data, tmp_path / 'work'))
    out = run_tool('tools/train.py', config)
    assert 'loss_keep_ratio' in out.stdout + out.stderr
    out = run_tool('tools/test.py', config, tmp_path / 'work' / 'iter_4.pth')
    assert re.search(r'mIoU: [\d.]+', out.stdout + out.stderr)


@pytest.mark.slow
@pytest.mark.parametrize('family,dense,dynamic', [('swin', 4.51, 4.04), ('convnext', 4.47, 3.57)])
def test_get_flops_of_the_imagenet_configs(family, dense, dynamic):
    """Inference-path FLOPs at 224: dense Swin-T / ConvNeXt-T and the keep-0.7 models (paper: 4.0 and 3.6)."""
    config = f'configs/dynamic_{family}/dynamic-{family}-t_r0.7_8xb128x4-120e_in1k.py'
    out = run_tool('tools/analysis/get_flops.py', config)
    rows = dict(re.findall(r'^\s+([\d.]+) \|\s+([\d.]+) \|', out.stdout, re.M))
    assert float(rows['1.000']) == pytest.approx(dense, abs=0.005)
    assert float(rows['0.700']) == pytest.approx(dynamic, abs=0.005)


@pytest.mark.slow
def test_benchmark_times_a_detector_backbone_side_by_side():
    config = 'configs/dynamic_convnext/mask-rcnn_dynamic-convnext-t-r0.7_fpn_1x_coco.py'
    out = run_tool('tools/analysis/benchmark.py', config, '--batch-size', '1', '--shape', '128', '192', '--rounds', '2',
                   '--iters', '1', '--warmup', '0', '--breakdown', '--backbone-only')
    assert 'DynamicConvNeXt (backbone), batch 1, 128x192' in out.stdout
    assert re.search(r'0\.700 \|\s+[\d.]+ \|\s+[\d.]+ \|\s+[\d.]+x \|\s+[\d.]+-[\d.]+\s*x \|\s+1\.\d\dx \|\s+-?\d+%',
                     out.stdout)
    # the breakdown: slow-path MLP FLOPs fall with the keep ratio, fast paths and predictors appear, the rest stays
    number = r'\s+([\d.]+)'
    rows = {name: [float(v) for v in values] for name, *values in re.findall(
        r'^\s*(slow-path MLPs|rest of the network|whole pass) \|' + number * 3 + r' \|' + number * 3, out.stdout, re.M)}
    assert rows['slow-path MLPs'][1] > 2 * rows['slow-path MLPs'][4]  # GFLOPs at 1.0 vs 0.7
    assert rows['rest of the network'][1] == pytest.approx(rows['rest of the network'][4], rel=0.02)
    assert rows['whole pass'][1] > rows['whole pass'][4]
    assert re.search(r'^\s*fast paths \|\s+- .* \|\s+[\d.]+\s+[\d.]+', out.stdout, re.M)
    assert re.search(r'keep 0\.70 would run [\d.]+x faster \(FLOPs allow 1\.\d\dx, -?\d+% of the FLOPs-allowed gain\)',
                     out.stdout)


def whole_model_rows(stdout: str):
    """The speed table {keep ratio: GFLOPs} and the parts table {part: [ms, share %] per setting} of a whole-model
    benchmark run."""
    gflops = {float(ratio): float(value) for ratio, value in re.findall(
        r'^\s*eager PyTorch \|\s+([\d.]+) \|\s+([\d.]+) \|\s+[\d.]+ \|\s+[\d.]+x \|', stdout, re.M)}
    parts = {name: [float(v) for v in values] for name, *values in re.findall(
        r'^\s*(backbone|neck|heads|rest|test step) \|\s+([\d.]+)\s+(\d+)% \|\s+([\d.]+)\s+(\d+)%$', stdout, re.M)}
    return gflops, parts


@pytest.mark.slow
def test_benchmark_times_the_whole_segmentor_side_by_side():
    """On a segmentation config: the whole test_step, both settings' whole-model GFLOPs, where the time goes."""
    config = 'configs/dynamic_swin/upernet_dynamic-swin-t-r0.7_8xb2-160k_ade20k-512x512.py'
    out = run_tool('tools/analysis/benchmark.py', config, '--batch-size', '1', '--shape', '128', '128', '--rounds', '2',
                   '--iters', '1', '--warmup', '0', '--compile', '--compile-backend', 'eager')
    assert 'EncoderDecoder with DynamicSwinTransformer (whole model: test_step), batch 1, 128x128' in out.stdout
    assert 'torch.compile: the backbone (the heads and resizing stay eager)' in out.stdout  # UperNet: no neck
    gflops, parts = whole_model_rows(out.stdout)
    assert set(gflops) == {1.0, 0.7}
    assert gflops[0.7] < gflops[1.0]  # the sparse stage's MLPs are part of the whole model's multiply-adds
    assert set(parts) == {'backbone', 'heads', 'rest', 'test step'}  # no neck: UperNet reads the stages' maps
    for column in (0, 2):
        assert 0 < parts['heads'][column + 1] < 100 and 0 < parts['backbone'][column + 1] < 100
        assert sum(parts[name][column] for name in ('backbone', 'heads', 'rest')) == \
            pytest.approx(parts['test step'][column], abs=0.5)
    with pytest.raises(AssertionError, match='--backbone-only'):
        run_tool('tools/analysis/benchmark.py', config, '--breakdown', '--rounds', '1')


@pytest.mark.slow
def test_whole_detector_benchmark_gives_both_settings_equal_head_work():
    """Random weights pass a keep-ratio-dependent number of boxes through the score threshold; the benchmark sets
    it to 0 so both settings' mask heads see max_per_img boxes, and says so (the config's with a flag)."""
    config = 'configs/dynamic_swin/mask-rcnn_dynamic-swin-t-r0.7_fpn_1x_coco.py'
    out = run_tool('tools/analysis/benchmark.py', config, '--batch-size', '1', '--shape', '64', '96', '--rounds', '1',
                   '--iters', '1', '--warmup', '0', '--cfg-options', 'model.test_cfg.rcnn.max_per_img=7')
    assert 'roi_head score_thr 0.05 -> 0 (every image keeps max_per_img=7 boxes)' in out.stdout
    assert 'detections per image: keep 1.00: 7, keep 0.70: 7' in out.stdout
    gflops, parts = whole_model_rows(out.stdout)
    assert set(parts) == {'backbone', 'neck', 'heads', 'rest', 'test step'}
    # the config's threshold; and the backbone and neck through torch.compile (the 'eager' backend: capture only)
    out = run_tool('tools/analysis/benchmark.py', config, '--batch-size', '1', '--shape', '64', '96', '--rounds', '1',
                   '--iters', '1', '--warmup', '0', '--config-detections', '--compile', '--compile-backend', 'eager')
    assert 'score_thr' not in out.stdout and 'detections per image: keep 1.00: ' in out.stdout
    assert re.search(r'torch\.compile \|\s+0\.700 \|', out.stdout) and 'the backbone and the neck' in out.stdout
    assert re.search(r"torch\.compile: dense [\d.]+x the eager dense model's images/s; keep 0\.70", out.stdout)
