"""One way in for weights: every route converts the checkpoint's layout and refuses misfits, naming file and keys.

Routes: tools/test.py (load_from), tools/train.py (load_from), apis.init_model, the distillation teacher,
init_cfg, the frameworks' own loaders (mmengine's load_checkpoint, with no hook of ours), and the converter CLI.
"""
import pickle
import re

import pytest
import torch
from mmengine.runner import load_checkpoint

from sparsevit_mm.apis import build_model, init_model
from sparsevit_mm.utils import CheckpointMismatchError

from .helpers import TINY_ARCH, make_imagenet_folder, run_tool, tiny_classifier_config
from .reference.official_vit import official_forward, random_official_state_dict

EMA = "\ncustom_hooks = [dict(type='EMAHook', momentum=1e-4, priority='ABOVE_NORMAL')]\n"


def official_tiny(seed=0, embed_dims=64, predictors=True, num_classes=2):
    """An official-layout DynamicViT state dict of the tiny test arch (patch 8, 4x4 grid at 32 px)."""
    sd = random_official_state_dict(embed_dims, 4, mlp_ratio=2.0, num_classes=num_classes, grid=4,
                                    predictors=predictors, seed=seed)
    sd['patch_embed.proj.weight'] = sd['patch_embed.proj.weight'][..., :8, :8].contiguous()
    return sd


def run_failing(*args):
    """Run a repo script that must fail; returns its stdout + stderr."""
    proc = run_tool(*args, timeout=600, check=False)
    return proc.stdout + proc.stderr


def predictions(path):
    with open(path, 'rb') as f:
        return torch.stack([torch.as_tensor(sample['pred_score']) for sample in pickle.load(f)])


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp('checkpoints')
    data = make_imagenet_folder(root / 'data', num_classes=2, per_class=3)
    config = root / 'tiny_ema.py'
    config.write_text(tiny_classifier_config(data, root / 'work') + EMA)
    return root, config


@pytest.mark.slow
def test_tools_test_takes_an_official_checkpoint_with_ema_hooks(setup):
    root, config = setup
    official, converted = root / 'official.pth', root / 'converted.pth'
    torch.save({'model': official_tiny(), 'epoch': 29}, official)
    out = run_tool('tools/model_converters/official_to_sparsevit.py', official, converted)
    assert 'score predictors included' in out.stdout
    outs = {}
    for name, ckpt in (('official', official), ('converted', converted)):
        run_tool('tools/test.py', config, ckpt, '--out', root / f'{name}.pkl')
        outs[name] = predictions(root / f'{name}.pkl')
    assert torch.equal(outs['official'], outs['converted'])
    # the predictions are those of the weights: other official weights predict otherwise
    torch.save({'model': official_tiny(seed=1)}, root / 'other.pth')
    run_tool('tools/test.py', config, root / 'other.pth', '--out', root / 'other.pkl')
    assert not torch.allclose(predictions(root / 'other.pkl'), outs['official'])


def test_tools_refuse_a_checkpoint_of_another_family_or_width(setup, tmp_path):
    root, config = setup
    # a (tiny) DynamicSwin classifier checkpoint on the DynamicViT config
    swin = build_model(dict(type='ImageClassifier', backbone=dict(
        type='DynamicSwinTransformer', arch=dict(embed_dims=32, depths=[1, 1, 2, 1], num_heads=[1, 2, 4, 8]),
        prune_layers=[1], out_indices=(3, )), neck=dict(type='GlobalAveragePooling'),
        head=dict(type='LinearClsHead', num_classes=2, in_channels=256)))
    other_family = tmp_path / 'swin.pth'
    torch.save({'state_dict': swin.state_dict(), 'meta': {}}, other_family)
    text = run_failing('tools/test.py', config, other_family)
    assert f'error: {other_family}' in text and 'does not fit' in text and 'Traceback' not in text  # one line
    assert 'backbone.blocks.0.attn.qkv.weight' in text and 'backbone.stages.0' in text  # missing, unexpected
    # DeiT-tiny-like weights (another width) on the config's width
    narrow = tmp_path / 'narrow.pth'
    torch.save({'model': official_tiny(embed_dims=32)}, narrow)
    text = run_failing('tools/test.py', config, narrow)
    assert str(narrow) in text and 'shape mismatches' in text and 'backbone.cls_token: checkpoint (1, 1, 32)' in text
    # tools/train.py with load_from refuses it before training
    text = run_failing('tools/train.py', config, '--work-dir', tmp_path / 'work', '--cfg-options',
                       f'load_from={narrow}')
    assert str(narrow) in text and 'shape mismatches' in text
    assert not list((tmp_path / 'work').glob('*.pth'))


def test_init_model_takes_a_dense_timm_checkpoint_and_refuses_misfits(setup, tmp_path):
    root, config = setup
    dense = official_tiny(predictors=False)  # timm / DeiT layout: a plain state dict without score predictors
    torch.save(dense, tmp_path / 'dense.pth')
    model = init_model(str(config), str(tmp_path / 'dense.pth'))
    assert torch.equal(model.backbone.blocks[1].mlp.fc1.weight, dense['blocks.1.mlp.fc1.weight'])
    assert torch.equal(model.head.layers.head.weight, dense['head.weight'])
    broken = {k: v for k, v in dense.items() if k != 'blocks.2.attn.proj.bias'}
    torch.save(broken, tmp_path / 'broken.pth')
    with pytest.raises(CheckpointMismatchError, match=r'broken\.pth.*missing keys: backbone\.blocks\.2\.attn\.proj'):
        init_model(str(config), str(tmp_path / 'broken.pth'))


def test_the_frameworks_own_loader_converts_and_refuses_misfits(tmp_path):
    """mmengine's load_checkpoint (what mmdet's / mmseg's / mmpretrain's tools use) with no hook of ours."""
    from mmengine.runner import load_checkpoint

    from sparsevit_mm.utils.config import read_config
    model_cfg = read_config('mmdet::swin/mask-rcnn_swin-t-p4-w7_fpn_1x_coco.py').model
    arch = dict(embed_dims=32, depths=[1, 1, 2, 1], num_heads=[1, 2, 4, 8])
    model_cfg.neck.in_channels = [32, 64, 128, 256]
    model_cfg.backbone = dict(type='SwinTransformer', **arch)  # mmdet's own Swin Mask R-CNN
    dense = build_model(model_cfg, scope='mmdet')
    torch.save({'state_dict': dense.state_dict()}, tmp_path / 'mmdet_swin.pth')
    model_cfg.backbone = dict(type='DynamicSwinTransformer', arch=arch, prune_layers=[1], keep_ratio=0.7)
    ours = build_model(model_cfg, scope='mmdet')
    load_checkpoint(ours, str(tmp_path / 'mmdet_swin.pth'))  # dense: predictors and fast paths keep their init
    assert torch.equal(ours.backbone.stages[2].blocks[1].ffn.layers[0][0].weight,
                       dense.backbone.stages[2].blocks[1].ffn.layers[0][0].weight)
    model_cfg.backbone.arch = dict(arch, embed_dims=48)
    model_cfg.neck.in_channels = [48, 96, 192, 384]
    wider = build_model(model_cfg, scope='mmdet')
    with pytest.raises(CheckpointMismatchError, match=r"at 'backbone\.'.*shape mismatches: patch_embed"):
        load_checkpoint(wider, str(tmp_path / 'mmdet_swin.pth'))


def test_teacher_and_init_cfg_routes(tmp_path):
    narrow = tmp_path / 'narrow.pth'
    torch.save({'model': official_tiny(embed_dims=32)}, narrow)
    backbone = dict(type='DynamicViT', arch=TINY_ARCH, img_size=32, patch_size=8, prune_layers=[1, 2, 3])
    head = dict(type='VisionTransformerClsHead', num_classes=2, in_channels=64)
    student = build_model(dict(type='DynamicViTClassifier', backbone=backbone, head=head,
                               teacher=dict(checkpoint=str(narrow))))
    with pytest.raises(CheckpointMismatchError, match=r'teacher checkpoint .*narrow\.pth.*shape mismatches'):
        student.init_weights()
    # init_cfg of the classifier: a backbone-only checkpoint may leave the head to its initialisation
    headless = {k: v for k, v in official_tiny().items() if not k.startswith('head.')}
    torch.save(headless, tmp_path / 'headless.pth')
    model = build_model(dict(type='DynamicViTClassifier', backbone=backbone, head=head,
                             init_cfg=dict(type='Pretrained', checkpoint=str(tmp_path / 'headless.pth'))))
    model.init_weights()
    assert torch.equal(model.backbone.score_predictors[2].classifier[4].weight,
                       headless['score_predictor.2.out_conv.4.weight'])


@pytest.mark.slow
def test_converter_asks_for_the_head_count(tmp_path):
    sd = official_tiny(num_classes=3)
    torch.save({'model': sd}, tmp_path / 'official.pth')
    images = torch.randn(2, 3, 32, 32)
    expected = official_forward(sd, images, num_heads=2, pruning_loc=(1, 2, 3), base_rate=0.7)

    def converted_logits(*extra):
        out = run_tool('tools/model_converters/official_to_sparsevit.py', tmp_path / 'official.pth',
                       tmp_path / 'ours.pth', *extra)
        checkpoint = torch.load(tmp_path / 'ours.pth')
        model = build_model(checkpoint['meta']['model']).eval()
        model.load_state_dict(checkpoint['state_dict'])
        with torch.no_grad():
            return model(images), out, checkpoint['meta']

    logits, out, meta = converted_logits('--num-heads', 2)
    assert torch.allclose(logits, expected, atol=1e-5), (logits - expected).abs().max()
    assert meta['inferred'] == [] and 'warning' not in out.stderr
    logits, out, meta = converted_logits()  # 64 channels: not an official width, so a guess (1 head), said aloud
    assert 'warning' in out.stderr and 'num_heads=1 was inferred' in out.stderr and '--num-heads' in out.stderr
    assert meta['inferred'] and meta['model']['backbone']['arch']['num_heads'] == 1
    assert not torch.allclose(logits, expected, atol=1e-3)  # why it matters


def test_converter_names_a_file_that_is_no_checkpoint(tmp_path):
    notes = tmp_path / 'notes.txt'
    notes.write_text('not a checkpoint\n')
    text = run_failing('tools/model_converters/official_to_sparsevit.py', notes, tmp_path / 'out.pth')
    assert f'{notes} is not a checkpoint' in text and 'Traceback' not in text
    broken = official_tiny()
    broken.pop('blocks.2.mlp.fc2.weight')
    torch.save({'model': broken}, tmp_path / 'broken.pth')
    text = run_failing('tools/model_converters/official_to_sparsevit.py', tmp_path / 'broken.pth', tmp_path / 'o.pth')
    assert 'missing keys: backbone.blocks.2.mlp.fc2.weight' in text and 'broken.pth' in text


def test_official_checkpoints_of_every_family_load_into_the_models_a_config_builds(tmp_path):
    """What tools/test.py CONFIG OFFICIAL.pth does (convert_for_model + check_fit, then load), for each family."""
    from sparsevit_mm.models import DVT, UViTDiffusion
    from sparsevit_mm.utils import load_weights

    from .helpers import TINY_DVT, TINY_UVIT
    from .reference.official_dvt import official_dvt_state_dict
    from .reference.official_hierarchical import random_official_convnext, random_official_swin
    small_swin = dict(embed_dims=32, depths=[2, 2, 6, 2], num_heads=[1, 2, 4, 8])
    small_convnext = dict(depths=[1, 1, 6, 1], channels=[16, 32, 64, 128])
    classifiers = {
        'LV-ViT': (dict(type='DynamicViT', arch=dict(embed_dims=64, num_layers=4, num_heads=4, mlp_ratio=2.0,
                                                     qkv_bias=False, stem='conv', residual_scale=2.0),
                        img_size=64, patch_size=16, prune_layers=[1, 2, 3], out_type='raw'),
                   dict(type='TokenLabelingClsHead', num_classes=3, in_channels=64), None,
                   random_official_state_dict(64, 4, mlp_ratio=2.0, num_classes=3, lvvit=True, grid=4)),
        'DynamicSwin': (dict(type='DynamicSwinTransformer', arch=small_swin, out_indices=(3, ), pad_small_map=False),
                        dict(type='LinearClsHead', num_classes=5, in_channels=256),
                        dict(type='GlobalAveragePooling'), random_official_swin(**small_swin)),
        'DynamicCNN': (dict(type='DynamicConvNeXt', arch=small_convnext),
                       dict(type='LinearClsHead', num_classes=5, in_channels=128), None,
                       random_official_convnext(**small_convnext)),
    }
    for family, (backbone, head, neck, official) in classifiers.items():
        model = build_model(dict(type='ImageClassifier', backbone=backbone, neck=neck, head=head))
        load_weights(model, {'model': official}, source=family)
        head_weight = dict(model.head.named_parameters())['cls_fc.weight' if family == 'LV-ViT' else 'fc.weight']
        assert torch.equal(head_weight, official['head.weight']), family
    # DVT: weights, exit costs and the fitted threshold table come from the official file
    dvt = DVT(arch=TINY_DVT, num_classes=3)
    official = {'model_state_dict': official_dvt_state_dict(dvt.state_dict()), 'flops': [0.1, 0.3, 0.7],
                'dynamic_threshold': torch.rand(59, 3),
                'budgeted_batch_classification': [torch.linspace(0.1, 0.7, 59).tolist(), [50.0] * 59]}
    fresh = DVT(arch=TINY_DVT, num_classes=3)
    load_weights(fresh, official, source='dvt')
    assert fresh.threshold_table.shape == (59, 3) and fresh.exit_gflops.tolist() == pytest.approx([0.1, 0.3, 0.7])
    assert torch.equal(fresh.heads[2].weight, dvt.heads[2].weight)
    # U-ViT: the official nnet.pth is the network's plain state dict
    diffusion = UViTDiffusion(network=dict(type='UViT', arch=TINY_UVIT, img_size=16, patch_size=2, in_channels=4))
    network = {k: v + 1.0 for k, v in diffusion.network.state_dict().items()}
    load_weights(diffusion, network, source='nnet.pth')
    assert torch.equal(diffusion.network.pos_embed, network['pos_embed'])
    with pytest.raises(CheckpointMismatchError, match=r'nnet\.pth.*missing keys: network\.norm\.weight'):
        load_weights(diffusion, {k: v for k, v in network.items() if k != 'norm.weight'}, source='nnet.pth')


# ------------------------------------------------------------------------------------------ one reader for files
BAD_FILES = {  # what each file is -> the message every route gives
    'text': 'is not a checkpoint: torch.save writes a zip archive',
    'truncated': 'is not a checkpoint torch can read',
    'url': 'could not be downloaded .* download the file and give its local path instead',
}


def checkpoint_files(root):
    """A text file, a truncated torch.save file, an unreachable URL and an official-layout safetensors file."""
    from safetensors.torch import save_file
    (root / 'notes.pth').write_text('these are not weights\n')
    torch.save({'model': official_tiny()}, root / 'full.pth')
    data = (root / 'full.pth').read_bytes()
    (root / 'truncated.pth').write_bytes(data[:len(data) // 2])
    save_file(official_tiny(), str(root / 'official.safetensors'))
    return {'text': root / 'notes.pth', 'truncated': root / 'truncated.pth',
            'url': 'http://127.0.0.1:9/deit_tiny.pth', 'safetensors': root / 'official.safetensors'}


@pytest.fixture(scope='module')
def files(tmp_path_factory):
    return checkpoint_files(tmp_path_factory.mktemp('files'))


@pytest.mark.parametrize('kind', [*BAD_FILES, 'safetensors'])
def test_every_python_route_reads_files_alike(setup, files, kind, tmp_path):
    root, config = setup
    path = str(files[kind])
    routes = {
        'init_model': lambda: init_model(str(config), path),
        'init_cfg': lambda: build_model(dict(type='DynamicViT', arch=TINY_ARCH, img_size=32, patch_size=8,
                                             prune_layers=[1, 2, 3],
                                             init_cfg=dict(type='Pretrained', checkpoint=path))).init_weights(),
        'mmengine load_checkpoint': lambda: load_checkpoint(init_model(str(config)), path),
    }
    for route, load in routes.items():
        if kind == 'safetensors':
            load()  # read and converted like any official checkpoint
        else:
            with pytest.raises((CheckpointMismatchError, FileNotFoundError), match=BAD_FILES[kind]):
                load()


@pytest.mark.slow
@pytest.mark.parametrize('kind', [*BAD_FILES, 'safetensors'])
def test_every_tool_reads_files_alike(setup, files, kind, tmp_path):
    root, config = setup
    runs = [('tools/test.py', config, files[kind]),
            ('tools/model_converters/official_to_sparsevit.py', files[kind], tmp_path / 'converted.pth')]
    for args in runs:
        if kind == 'safetensors':
            run_tool(*args)
        else:
            text = run_failing(*args)
            assert re.search(BAD_FILES[kind], text) and 'Traceback' not in text, text[-2000:]
