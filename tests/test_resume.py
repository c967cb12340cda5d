"""Bit-exact resume (RandomStateHook): killed after epoch 2 and resumed == never stopped, in 1 and 2 processes."""
import io
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from sparsevit_mm.engine import RandomStateHook, random_state
from sparsevit_mm.launch import add_random_state_hook
from sparsevit_mm.utils.config import load_config

from .helpers import REPO, make_imagenet_folder, run_tool, save_tiny_teacher, tiny_classifier_config, torchrun

EPOCHS = 4
ENV = {'OMP_NUM_THREADS': '1'}  # two shared cores; the same for every run of a comparison


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp('resume')
    data = make_imagenet_folder(root / 'data', num_classes=2, per_class=4)
    teacher = save_tiny_teacher(root / 'teacher.pth')
    return root, data, teacher


def epoch_config(root, data, teacher, name, num_workers=0, batch_size=4):
    """The tiny distilled DynamicViT (keep ratio 0.7: Gumbel noise) trained by epochs, random flips, shuffled."""
    text = tiny_classifier_config(data, root / 'unused', teacher, keep_ratio=0.7, batch_size=batch_size) + f"""
train_dataloader['num_workers'] = {num_workers}
train_dataloader['sampler'] = dict(type='DefaultSampler', shuffle=True)
train_dataloader['dataset']['pipeline'] = [dict(type='LoadImageFromFile'), dict(type='RandomFlip', prob=0.5),
                                           dict(type='PackInputs')]
train_cfg = dict(type='EpochBasedTrainLoop', max_epochs={EPOCHS}, val_interval=1)
default_hooks['checkpoint'] = dict(type='CheckpointHook', interval=1, by_epoch=True)
log_processor = dict(by_epoch=True)
randomness = dict(seed=0)
"""
    path = root / f'{name}.py'
    path.write_text(text)
    return path


def popen(args, log, cwd):
    """A repo script in its own process group (so that torchrun and its workers can be killed together), run in
    ``cwd``: a run killed while validating leaves mmengine's result exchange (``.dist_test/``) there."""
    env = dict(os.environ, PYTHONPATH=str(REPO), **ENV)
    return subprocess.Popen([sys.executable, *map(str, args)], cwd=cwd, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)


def kill_after_epoch_2(proc, work_dir, log_path, timeout=300):
    """Wait until CheckpointHook has written epoch_2.pth (it writes ``last_checkpoint`` after the file), then
    SIGKILL the whole process group."""
    marker = Path(work_dir) / 'last_checkpoint'
    deadline = time.monotonic() + timeout
    try:
        while True:
            saved = marker.read_text().strip() if marker.is_file() else ''
            if saved and int(Path(saved).stem.split('_')[-1]) >= 2:
                return Path(saved).name
            if proc.poll() is not None:
                raise AssertionError(f'training ended ({proc.returncode}) before epoch 2:\n'
                                     f'{Path(log_path).read_text()[-6000:]}')
            if time.monotonic() > deadline:
                raise AssertionError(f'no epoch_2.pth after {timeout} s')
            time.sleep(0.05)
    finally:
        kill_tree(proc)


def descendants(pid):
    """Every process below ``pid`` (from /proc: torchrun starts each worker in a session of its own, so killing
    torchrun's process group would leave the workers training on)."""
    children = {}
    for stat in Path('/proc').glob('[0-9]*/stat'):
        try:
            ppid = int(stat.read_text().rsplit(')', 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def kill_tree(proc):
    """SIGKILL a launched script with everything it started: a crash, no chance to clean up."""
    for pid in [proc.pid, *descendants(proc.pid)]:  # collected first: orphans leave the tree
        for kill in (os.killpg, os.kill):
            try:
                kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
    proc.wait()


def wait_ok(proc, log_path, timeout=600):
    assert proc.wait(timeout=timeout) == 0, Path(log_path).read_text()[-6000:]


def assert_same_weights(path_a, path_b):
    a = torch.load(path_a, map_location='cpu', weights_only=False)['state_dict']
    b = torch.load(path_b, map_location='cpu', weights_only=False)['state_dict']
    assert list(a) == list(b)
    diff = max((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].numel())
    assert diff == 0, f'resumed weights differ from the uninterrupted run by up to {diff:.3g}'
    for k in a:
        assert torch.equal(a[k], b[k]), k


def assert_random_states(path, world_size):
    checkpoint = torch.load(path, map_location='cpu', weights_only=False)
    states = checkpoint['random_states']
    assert isinstance(states, list) and len(states) == world_size
    buffer = io.BytesIO()
    torch.save({'random_states': states}, buffer)
    buffer.seek(0)
    torch.load(buffer, weights_only=True)  # plain types only: no allow-listing needed


def kill_and_resume(setup, name, world_size=1, num_workers=0, batch_size=4):
    root, data, teacher = setup

    def launch():  # a fresh port for each torchrun
        return [*torchrun(), REPO / 'tools/train.py'] if world_size > 1 else [REPO / 'tools/train.py']

    extra = ['--launcher', 'pytorch'] if world_size > 1 else []
    config = epoch_config(root, data, teacher, name, num_workers=num_workers, batch_size=batch_size)
    work_a, work_b = root / f'{name}_A', root / f'{name}_B'
    log_a, log_b = root / f'{name}_A.log', root / f'{name}_B.log'
    with open(log_a, 'w') as fa, open(log_b, 'w') as fb:
        run_a = popen([*launch(), config, '--work-dir', work_a, *extra], fa, root)  # uninterrupted
        run_b = popen([*launch(), config, '--work-dir', work_b, *extra], fb, root)
        try:
            kill_after_epoch_2(run_b, work_b, log_b)
            wait_ok(run_a, log_a)
        finally:
            if run_a.poll() is None:
                kill_tree(run_a)
    assert (work_b / 'epoch_2.pth').is_file()
    assert not (work_b / f'epoch_{EPOCHS}.pth').is_file(), 'the killed run was not stopped'
    out = run_tool(*launch(), config, '--work-dir', work_b, '--resume', work_b / 'epoch_2.pth',
                   *extra, env=ENV)
    text = out.stdout + out.stderr
    assert 'resumed epoch: 2' in text, text[-4000:]
    assert 'RNG states restored' in text
    assert_random_states(work_a / f'epoch_{EPOCHS}.pth', world_size)
    assert_same_weights(work_a / f'epoch_{EPOCHS}.pth', work_b / f'epoch_{EPOCHS}.pth')


@pytest.mark.parametrize('num_workers', [0, 1])
def test_single_process_resume_is_bit_exact(setup, num_workers):
    kill_and_resume(setup, f'single_w{num_workers}', num_workers=num_workers)


def test_two_process_gloo_resume_is_bit_exact(setup):
    kill_and_resume(setup, 'dist', world_size=2, batch_size=2)  # 8 images: 2 iterations per epoch and rank


# ---------------------------------------------------------------------------------------------------- the hook


def draws():
    return torch.rand(4), np.random.rand(3), np.random.randn(1), random.random(), random.gauss(0, 1)


def assert_draws_equal(x, y):
    assert torch.equal(x[0], y[0]) and np.array_equal(x[1], y[1]) and np.array_equal(x[2], y[2])
    assert x[3:] == y[3:]


def scramble():
    torch.manual_seed(1234)
    np.random.seed(1234)
    random.seed(1234)


def fake_runner(**loop):
    return SimpleNamespace(_resume=True, epoch=2, iter=4, hooks=[], train_loop=SimpleNamespace(**loop))


def saved_checkpoint():
    """A checkpoint the hook filled, after a round trip through torch's safe loader; and the draws that follow."""
    torch.manual_seed(7)
    np.random.seed(7)
    random.seed(7)
    np.random.randn(1)  # leaves a cached gaussian in numpy's state
    random.gauss(0, 1)  # and in python's
    checkpoint = {}
    RandomStateHook().before_save_checkpoint(fake_runner(), checkpoint)
    expected = draws()
    assert len(checkpoint['random_states']) == 1
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True), expected


def test_hook_restores_states_at_the_first_epoch_after_resume():
    checkpoint, expected = saved_checkpoint()
    hook = RandomStateHook()
    runner = fake_runner(epoch=2, iter=4, dataloader=[0, 1])
    hook.after_load_checkpoint(runner, checkpoint)
    scramble()
    hook.before_train_epoch(runner)
    assert_draws_equal(draws(), expected)
    scramble()
    hook.before_train_epoch(runner)  # only once
    assert not torch.equal(torch.rand(4), expected[0])


def test_hook_restores_iter_based_states_right_before_the_first_new_batch():
    checkpoint, expected = saved_checkpoint()

    def batches():  # each fetch consumes random numbers, like a data pipeline
        while True:
            yield draws()

    original = batches()
    loop = SimpleNamespace(epoch=0, iter=3, dataloader_iterator=original)
    hook = RandomStateHook()
    hook.after_load_checkpoint(fake_runner(), checkpoint)
    scramble()
    hook.before_train_epoch(SimpleNamespace(train_loop=loop))
    assert loop.dataloader_iterator is not original
    skipped = [next(loop.dataloader_iterator) for _ in range(3)]  # the batches already trained on
    assert not torch.equal(skipped[0][0], expected[0])
    assert_draws_equal(next(loop.dataloader_iterator), expected)
    assert loop.dataloader_iterator is original


def test_hook_warns_and_keeps_going_without_matching_states(monkeypatch):
    messages = []
    monkeypatch.setattr(random_state, 'print_log', lambda msg, **kw: messages.append((msg, kw.get('level'))))
    checkpoint, _ = saved_checkpoint()
    two_ranks = {'random_states': checkpoint['random_states'] * 2}
    for resumed in (two_ranks, {}):  # saved by 2 processes, resumed by 1; saved without the hook
        messages.clear()
        hook = RandomStateHook()
        hook.after_load_checkpoint(fake_runner(), resumed)
        assert len(messages) == 1 and 'not bit-identical' in messages[0][0] and messages[0][1] is not None
        scramble()
        reference = torch.rand(4)
        scramble()
        hook.before_train_epoch(fake_runner(epoch=2, iter=4, dataloader=[0, 1]))
        assert torch.equal(torch.rand(4), reference), 'nothing is restored'
    messages.clear()
    runner = fake_runner()
    runner._resume = False  # load_from: the states belong to another run, silently ignored
    hook = RandomStateHook()
    hook.after_load_checkpoint(runner, checkpoint)
    assert hook._resume_states is None and not messages


def test_hook_restores_but_warns_where_resume_cannot_be_exact(monkeypatch):
    messages = []
    monkeypatch.setattr(random_state, 'print_log', lambda msg, **kw: messages.append(msg))
    for loader, why in ((SimpleNamespace(persistent_workers=True, num_workers=2), 'persistent workers'),
                        ([0, 1, 2], 'middle of an epoch')):  # iter 4 of epoch 2 with 3 batches an epoch
        checkpoint, expected = saved_checkpoint()
        messages.clear()
        hook = RandomStateHook()
        hook.after_load_checkpoint(fake_runner(), checkpoint)
        scramble()
        hook.before_train_epoch(fake_runner(epoch=2, iter=4, dataloader=loader))
        assert_draws_equal(draws(), expected)
        assert any(why in m and 'not bit-identical' in m for m in messages), messages


def test_validation_is_rng_neutral():
    hook = RandomStateHook()
    scramble()
    expected = draws()
    scramble()
    hook.before_val(None)
    draws()  # validation's own draws (its dataloader iterator seed, ...)
    hook.after_val(None)
    assert_draws_equal(draws(), expected)


def test_add_random_state_hook_and_shipped_configs(tmp_path):
    cfg = load_config(str(epoch_config(tmp_path, tmp_path / 'data', None, 'probe')))
    assert add_random_state_hook(cfg) and not add_random_state_hook(cfg)
    assert [h['type'] for h in cfg.custom_hooks].count('RandomStateHook') == 1
    # Configs that set custom_hooks keep the hook (lists replace their base's); the others inherit theirs.
    setting = [p for p in sorted(REPO.glob('configs/*/*.py')) if re.search(r'^custom_hooks', p.read_text(), re.M)]
    assert len(setting) >= 10
    for path in setting:
        assert any(h['type'] == 'RandomStateHook' for h in load_config(str(path)).custom_hooks), path
