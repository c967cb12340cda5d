"""The forked tool runs the tests use: a script's status, output, argv, environment and timeout as in a new
interpreter, and no sparsevit_mm preloaded (our registration is exercised on every run)."""
import subprocess

import pytest

from .helpers import run_tool

SCRIPT = """
import os, sys
print('argv', sys.argv[1:], 'cwd-is-repo', os.path.isfile('setup.py'))
print('preloaded', sorted(name for name in ('sparsevit_mm', 'mmdet.models') if name in sys.modules))
print('env', os.environ.get('PROBE'), file=sys.stderr)
if __name__ == '__main__' and sys.argv[1] == 'fail':
    raise ValueError('a bad value')
if sys.argv[1] == 'exit':
    sys.exit(3)
if sys.argv[1] == 'sleep':
    import time
    time.sleep(60)
"""


@pytest.fixture
def script(tmp_path):
    path = tmp_path / 'probe.py'
    path.write_text(SCRIPT)
    return path


def test_a_forked_run_sees_its_argv_cwd_and_environment_and_no_sparsevit_mm(script):
    out = run_tool(script, 'ok', 2, env={'PROBE': 'here'})
    assert "argv ['ok', '2'] cwd-is-repo True" in out.stdout
    assert "preloaded ['mmdet.models']" in out.stdout  # the frameworks are imported, our package is not
    assert out.stderr.strip() == 'env here'
    assert 'preloaded []' in run_tool(script, 'ok', fresh=True).stdout  # a new interpreter


def test_a_forked_run_fails_as_a_script_does(script):
    out = run_tool(script, 'fail', check=False)
    assert out.returncode == 1 and 'ValueError: a bad value' in out.stderr
    assert run_tool(script, 'exit', check=False).returncode == 3
    with pytest.raises(AssertionError, match=r"\['.*probe.py', 'exit'\] failed \(3\)"):
        run_tool(script, 'exit')
    with pytest.raises(AssertionError, match='succeeded, a failure was expected'):
        run_tool(script, 'ok', check=False)


def test_a_forked_run_past_its_timeout_is_killed_and_the_server_goes_on(script):
    with pytest.raises(subprocess.TimeoutExpired):
        run_tool(script, 'sleep', timeout=2)
    assert 'argv' in run_tool(script, 'ok').stdout
