"""The offline install's and the wheelhouse's argument checks, and the GPU report run on the CPU (--quick)."""
import os
import re
import subprocess
import sys

import pytest
import torch

from .helpers import REPO


def bash(*args, env=None, timeout=60):
    return subprocess.run(['bash', *args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


@pytest.mark.parametrize('args,message', [
    (['--use-current-torch'], '--use-current-torch goes with --offline WHEELHOUSE'),
    (['--offline', 'wheels'], 'add --use-current-torch'),
    (['--offline', '/nonexistent/wheels', '--use-current-torch'], "wheelhouse '/nonexistent/wheels' is not a folder"),
    (['--ops-in-background'], '--ops-in-background goes with --offline'),
    (['--offline'], '--offline wants the wheelhouse folder'),
    (['--fast'], "unknown argument '--fast'"),
])
def test_install_refuses_wrong_arguments_before_touching_anything(args, message):
    result = bash('tools/install.sh', *args)
    assert result.returncode == 2 and message in result.stderr, result.stderr


def test_install_offline_names_what_the_wheelhouse_lacks(tmp_path):
    (tmp_path / 'requirements.txt').write_text('addict\n')
    result = bash('tools/install.sh', '--offline', str(tmp_path), '--use-current-torch')
    assert result.returncode == 2 and 'has no frameworks.txt: make it with tools/make_wheelhouse.sh' in result.stderr


@pytest.mark.parametrize('args,message', [
    ([], 'give the output folder'),
    (['--python', '3', 'out'], "--python wants e.g. 3.12, got '3'"),
    (['a', 'b'], "one OUT_DIR, got 'a' and 'b'"),
    (['--mirror', 'x', 'out'], 'unknown option --mirror'),
])
def test_make_wheelhouse_refuses_wrong_arguments(args, message):
    result = bash('tools/make_wheelhouse.sh', *args)
    assert result.returncode == 2 and message in result.stderr, result.stderr


@pytest.mark.parametrize('script,usage', [
    ('tools/install.sh', 'bash tools/install.sh --offline WHEELHOUSE --use-current-torch [--ops-in-background]'),
    ('tools/make_wheelhouse.sh', 'bash tools/make_wheelhouse.sh [--python 3.12] [--platform TAG]... [--with SPEC]...'),
    ('tools/analysis/gpu_report.sh', 'bash tools/analysis/gpu_report.sh OUT_DIR --device cpu --quick'),
])
def test_scripts_print_their_whole_header_as_help(script, usage):
    result = bash(script, '--help')
    assert result.returncode == 0 and usage in result.stdout
    assert 'set -' not in result.stdout and not result.stdout.startswith('!')  # the comment block, nothing else


@pytest.mark.skipif(torch.cuda.is_available(), reason='checks the refusal on a machine without a GPU')
def test_gpu_report_without_a_gpu_says_how_to_check_on_the_cpu(tmp_path):
    result = bash('tools/analysis/gpu_report.sh', str(tmp_path), env=dict(PYTHON=sys.executable))
    assert result.returncode == 2 and '--device cpu --quick' in result.stderr


@pytest.mark.slow
def test_gpu_report_runs_every_part_on_the_cpu(tmp_path):
    """The report command of a GPU run, on the CPU with --quick: every part runs and lands in one report."""
    result = bash('tools/analysis/gpu_report.sh', str(tmp_path), '--device', 'cpu', '--quick', '--budget', '900',
                  env=dict(PYTHON=sys.executable, VIRTUAL_ENV=''), timeout=1200)
    report = (tmp_path / 'report.md').read_text()
    assert result.returncode == 0, result.stdout[-3000:] + report[-3000:]
    parts = re.findall(r'^\| (.+?) \| (ok|FAILED.*?|stopped.*?|not run.*?) \| (\d+) \| `', report, re.M)
    assert [title for title, _, _ in parts] == [
        'CUDA tests (pytest -m cuda)', 'DeiT-S batch 2', 'Segmenter DynamicViT-S batch 1',
        'Mask R-CNN DynamicViT-S batch 1', 'train Segmenter DynamicViT-S', 'train Mask R-CNN DynamicViT-S']
    assert all(status == 'ok' for _, status, _ in parts), parts
    # the numbers reach the summary tables: a speed-up per backend, and the training step's time and memory ratios
    speed = r'[\d.]+ / [\d.]+ \(\d+\.\d\dx\)'  # images/s dense / sparse (speed-up)
    assert re.search(rf'^\| DeiT-S batch 2 \| 1\.\d\dx \| {speed} \| {speed} \| - \|$', report, re.M), report
    assert re.search(r'^\| Mask R-CNN DynamicViT-S batch 1 \| [\d.]+x \| [\d.]+ / [\d.]+ ', report, re.M)
    assert re.search(r'^\| train Mask R-CNN DynamicViT-S \| [\d.]+ \| [\d.]+ \| [\d.]+x \| \d+ \| \d+ \| [\d.]+x \|$',
                     report, re.M), report
    assert 'torch ' + torch.__version__ in report
    for name in ('DeiT-S_batch_2.json', 'train_Mask_R-CNN_DynamicViT-S.json'):
        assert (tmp_path / name).exists()
