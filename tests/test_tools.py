"""Our tools/ end to end on data the tests generate: train, test, resume (1 and 2 processes), convert, analyse."""
import json
import os
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sparsevit_mm.apis import init_model

from .helpers import (REPO, failure_lines, make_imagenet_folder, run_tool, save_tiny_teacher, tiny_classifier_config,
                      torchrun)


def scalars(work_dir):
    """Entries of mmengine's scalars.json log (one dict per logged step)."""
    files = sorted(Path(work_dir).glob('*/vis_data/scalars.json'))
    assert files, f'no scalars.json under {work_dir}'
    return [json.loads(line) for f in files for line in f.read_text().splitlines()]


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp('tools')
    data = make_imagenet_folder(root / 'data', num_classes=2, per_class=6)
    teacher = save_tiny_teacher(root / 'teacher.pth')
    return root, data, teacher


def write_config(root, data, teacher, name, work_dir, **kwargs):
    path = root / f'{name}.py'
    path.write_text(tiny_classifier_config(data, work_dir, teacher, **kwargs))
    return path


@pytest.mark.slow
def test_train_test_resume(setup):
    root, data, teacher = setup
    work = root / 'work'
    config = write_config(root, data, teacher, 'tiny', work, max_iters=4)
    run_tool('tools/train.py', config)
    assert (work / 'iter_4.pth').is_file() and (work / 'iter_2.pth').is_file()
    logged = scalars(work)
    names = set().union(*logged)
    for term in ('loss_cls', 'loss_keep_ratio', 'loss_distill_logits', 'loss_distill_tokens', 'keep_ratio_stage1'):
        assert term in names, f'{term} missing from the training log'

    out = run_tool('tools/test.py', config, work / 'iter_4.pth', '--out', root / 'preds.pkl')
    assert re.search(r'accuracy/top1: \d', out.stdout + out.stderr)
    assert (root / 'preds.pkl').is_file()
    # The budget knob at test time, without retraining: other tokens, other scores.
    out = run_tool('tools/test.py', config, work / 'iter_4.pth', '--out', root / 'preds_04.pkl', '--cfg-options',
                   'model.backbone.keep_ratio=0.4')
    assert 'accuracy/top1' in out.stdout + out.stderr
    scores = [np.stack([np.asarray(p['pred_score']) for p in pickle.loads((root / name).read_bytes())])
              for name in ('preds.pkl', 'preds_04.pkl')]
    assert scores[0].shape == scores[1].shape and np.abs(scores[0] - scores[1]).max() > 1e-4

    out = run_tool('tools/train.py', config, '--resume', '--cfg-options', 'train_cfg.max_iters=6')
    text = out.stdout + out.stderr
    assert 'resumed' in text.lower() and 'iter_4.pth' in text
    assert (work / 'iter_6.pth').is_file()
    state = torch.load(work / 'iter_6.pth', weights_only=False)
    assert state['meta']['iter'] == 6


@pytest.mark.slow
def test_two_process_gloo_train_test_resume(setup):
    root, data, teacher = setup
    work = root / 'work_dist'
    config = write_config(root, data, teacher, 'tiny_dist', work, max_iters=2)
    env = {'OMP_NUM_THREADS': '1'}

    out = run_tool(*torchrun(), 'tools/train.py', config, '--launcher', 'pytorch', env=env)
    assert (work / 'iter_2.pth').is_file()
    text = out.stdout + out.stderr
    assert 'Distributed training: True' in text and 'GPU number: 2' in text  # mmengine's words for world size 2
    out = run_tool(*torchrun(), 'tools/test.py', config, work / 'iter_2.pth', '--launcher', 'pytorch', env=env)
    assert 'accuracy/top1' in out.stdout + out.stderr
    run_tool(*torchrun(), 'tools/train.py', config, '--launcher', 'pytorch', '--resume', '--cfg-options',
             'train_cfg.max_iters=4', env=env)
    assert torch.load(work / 'iter_4.pth', weights_only=False)['meta']['iter'] == 4


TEARDOWN_SCRIPT = """
import os
import torch
import torch.distributed as dist
from mmengine.config import Config
from sparsevit_mm.launch import setup_launcher, teardown_distributed

def threads():
    return len(os.listdir('/proc/self/task'))

torch.set_num_threads(1)
torch.ones(8, 8) @ torch.ones(8, 8)
before = threads()
setup_launcher(Config(), 'pytorch')
model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 1))
model(torch.randn(2, 4)).sum().backward()
dist.all_gather_object([None, None], dict(rank=dist.get_rank()))
holder = dict(model=model)
holder['self'] = holder  # only the garbage collector frees it, as with mmengine's Runner
del model, holder
during = threads()
teardown_distributed()
print(f'rank {os.environ["RANK"]} threads before={before} during={during} after={threads()}')
"""


@pytest.mark.slow
@pytest.mark.skipif(not Path('/proc/self/task').is_dir(), reason='counts threads through /proc (Linux)')
def test_teardown_joins_gloo_threads_before_interpreter_exit(tmp_path):
    """Gloo threads alive at interpreter finalization can abort the process (1 run in ~40, under load): the teardown
    must free the group, even when a reference cycle holds the DDP wrapper, and join its threads."""
    script = tmp_path / 'teardown.py'
    script.write_text(TEARDOWN_SCRIPT)
    out = run_tool(*torchrun(), script, env={'OMP_NUM_THREADS': '1'})
    counts = re.findall(r'threads before=(\d+) during=(\d+) after=(\d+)', out.stdout)
    assert len(counts) == 2, out.stdout + out.stderr
    for before, during, after in counts:
        assert int(during) > int(before), 'the gloo group should run threads of its own'
        assert int(after) == int(before), f'gloo threads survive the teardown: {before} before, {after} after'


FAIL_ALONE_HOOK = """
from mmengine.dist import get_rank
from mmengine.hooks import Hook
from mmengine.registry import HOOKS


@HOOKS.register_module()
class FailAloneHook(Hook):
    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        if get_rank() == 1:
            raise RuntimeError(f'rank 1 fails alone at iteration {runner.iter}')
"""


@pytest.mark.slow
def test_a_rank_that_fails_alone_ends_the_run_with_its_error(setup, tmp_path):
    """Rank 0 goes on into the next iteration's all-reduce; the run must end with rank 1's error at once, not hang
    until gloo's 30-minute timeout."""
    _, data, _ = setup
    (tmp_path / 'fail_alone.py').write_text(FAIL_ALONE_HOOK)
    config = tmp_path / 'fail_alone_config.py'
    config.write_text(tiny_classifier_config(data, tmp_path / 'work', max_iters=4)
                      + "custom_imports = dict(imports=['sparsevit_mm', 'fail_alone'], allow_failed_imports=False)\n"
                      + "custom_hooks = [dict(type='FailAloneHook')]\n")
    env = {'OMP_NUM_THREADS': '1', 'PYTHONPATH': f'{REPO}{os.pathsep}{tmp_path}'}
    out = run_tool(*torchrun(), 'tools/train.py', config, '--launcher', 'pytorch', env=env, timeout=120,
                   check=False)
    text = out.stdout + out.stderr
    assert re.search(r'RuntimeError: rank 1 fails alone at iteration \d', text), failure_lines(text)
    assert 'Root Cause' in text, text[-3000:]  # torchrun's summary; the entry point records the exception for it
    root_cause = text.partition('Root Cause')[2]
    assert 'rank 1 fails alone' in root_cause, root_cause[-3000:]


@pytest.mark.slow
def test_get_flops_deit_small_matches_the_paper():
    out = run_tool('tools/analysis/get_flops.py', 'configs/dynamicvit/dynamicvit-deit-small_r0.7_8xb128-30e_in1k.py',
                   '--keep-ratios', '1.0', '0.7')
    rows = dict(re.findall(r'^\s+([\d.]+) \|\s+([\d.]+) \|', out.stdout, re.M))
    assert float(rows['1.000']) == pytest.approx(4.6, abs=0.1)
    assert float(rows['0.700']) == pytest.approx(2.9, abs=0.1)


@pytest.mark.slow
def test_benchmark_prints_side_by_side_ratio():
    out = run_tool('tools/analysis/benchmark.py', 'configs/dynamicvit/dynamicvit-deit-small_r0.7_8xb128-30e_in1k.py',
                   '--batch-size', '2', '--rounds', '1', '--iters', '1', '--warmup', '1')
    assert re.search(r'1\.000 \|\s+4\.61 \|\s+[\d.]+ \|\s+1\.00x', out.stdout)
    assert re.search(r'0\.700 \|\s+2\.97 \|\s+[\d.]+ \|\s+[\d.]+x \|\s+[\d.]+-[\d.]+\s*x \|\s+1\.55x \|\s+-?\d+% '
                     r'\(-?\d+%--?\d+%\)', out.stdout)
    assert 'freed memory kept' in out.stdout


@pytest.mark.slow
def test_visualize_tokens(setup, tmp_path):
    root, data, teacher = setup
    config = write_config(root, data, None, 'tiny_vis', tmp_path / 'vis')
    image = tmp_path / 'demo.png'
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 40, 3), dtype=np.uint8)).save(image)
    ckpt = save_tiny_teacher(tmp_path / 'model.pth')
    out_png = tmp_path / 'tokens.png'
    out = run_tool('tools/visualize_tokens.py', image, config, ckpt, '--out', out_png)
    assert '3 pruning stages' in out.stdout
    assert re.search(r'prediction: class_[01]\b', out.stdout)  # the class name, not an index
    with Image.open(out_png) as png:
        assert png.size[0] > png.size[1] > 100


@pytest.mark.slow
def test_visualize_tokens_of_a_dynamic_swin_detector(tmp_path):
    """The slow-path positions of each predictor on the test-size image, and the classes the detector finds."""
    from .helpers import detection_config, make_coco
    coco = make_coco(tmp_path / 'coco', num_images=2)
    config = tmp_path / 'mask_rcnn.py'
    config.write_text(detection_config('swin', coco, tmp_path / 'work'))  # test size 96 x 128
    from sparsevit_mm.apis import init_model
    model = init_model(str(config))
    torch.save({'state_dict': model.state_dict(), 'meta': {}}, tmp_path / 'detector.pth')
    image = tmp_path / 'street.png'
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 400, 3), dtype=np.uint8)).save(image)
    out = run_tool('tools/visualize_tokens.py', image, config, tmp_path / 'detector.pth', '--out', tmp_path / 'd.png',
                   '--score-threshold', '0.0')
    assert '1 pruning stages' in out.stdout and re.search(r'detected \(score >= 0.0\): (box|blob)', out.stdout)
    with Image.open(tmp_path / 'd.png') as png:
        assert png.size[0] > png.size[1]


@pytest.mark.slow
def test_import_time_tool_prints_every_row():
    out = run_tool('tools/analysis/import_time.py', '--repeats', '1')
    rows = dict(re.findall(r'^\s*(.+?) \|\s+([\d.]+)$', out.stdout, re.M))
    assert set(rows) == {'import torch', 'mmpretrain / mmdet / mmseg registries', 'import sparsevit_mm',
                         'import sparsevit_mm.layers', 'sparsevit_mm + build DynamicViT'}
    assert all(float(value) > 0 for value in rows.values())


# ------------------------------------------------------------------------------------------ anticipated mistakes
def one_line_failure(*args):
    """Run a tool that must fail; return its last line, after checking that no traceback was printed."""
    out = run_tool(*args, check=False)
    text = (out.stdout + out.stderr).strip()
    assert 'Traceback' not in text, text[-3000:]
    return text.splitlines()[-1]


@pytest.mark.slow
def test_anticipated_mistakes_end_tools_with_one_line(setup, tmp_path):
    root, data, teacher = setup
    config = write_config(root, data, teacher, 'mistakes', tmp_path / 'empty_work', max_iters=2)
    line = one_line_failure('tools/train.py', config, '--resume')
    assert 'nothing to resume in the work dir' in line and '--resume auto' in line
    assert 'no such checkpoint file' in one_line_failure('tools/train.py', config, '--resume', tmp_path / 'x.pth')
    if not torch.cuda.is_available():
        assert '--amp needs a CUDA device' in one_line_failure('tools/train.py', config, '--amp')
    dvt_config = 'configs/dvt/dvt-t2t-vit-12_8xb128-310e_in1k.py'
    torch.save(init_model(dvt_config).state_dict(), tmp_path / 'dvt.pth')
    assert 'builds DVT, which has no backbone: visualize_tokens.py shows the tokens a token-sparse backbone' in \
        one_line_failure('tools/visualize_tokens.py', tmp_path / 'image.png', dvt_config, tmp_path / 'dvt.pth')
    assert "argument --rounds: 0 is below the smallest allowed value, 1" in one_line_failure(
        'tools/analysis/benchmark.py', config, '--rounds', '0')
    # "resume if possible": nothing there, so it trains from the start
    out = run_tool('tools/train.py', config, '--resume', 'auto')
    assert (tmp_path / 'empty_work' / 'iter_2.pth').is_file(), out.stdout[-2000:]


@pytest.mark.slow
def test_a_tool_run_prints_no_upstream_deprecation_warning(setup):
    root, data, teacher = setup
    config = write_config(root, data, teacher, 'quiet', root / 'quiet_work')
    for args in ((config, '--keep-ratios', '0.7', '--shape', '32'),
                 ('configs/dynamicvit/segmenter_dynamicvit-deit-small-r0.7_mask_8xb1-160k_ade20k-512x512.py',
                  '--keep-ratios', '0.7', '--shape', '64', '64')):
        out = run_tool('tools/analysis/get_flops.py', *args, fresh=True)  # a fresh interpreter imports everything
        text = out.stdout + out.stderr
        assert 'GFLOPs' in text or 'FLOPs' in text
        assert 'pkg_resources is deprecated' not in text and 'build_loss' not in text, text[-3000:]
