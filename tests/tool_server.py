"""Run repo tools for the tests in forked children of one process that has already imported the frameworks.

A tool run in a fresh interpreter spends most of its seconds importing torch, mmcv's ops and the model code of
mmpretrain / mmdet / mmseg, before it does the few iterations a test asks for. This server imports those once and
forks a child per run; the child runs the script as ``__main__`` (``runpy``), with the request's argv, cwd and
environment, its stdout / stderr written to files, and exits with the script's status after its atexit
handlers.

``sparsevit_mm`` itself is *not* preloaded: each tool still registers our models through the config's
``custom_imports`` or its own imports, exactly as it would for a user. The server never computes with torch, so
no thread pool exists to be broken by fork. Tests that need a truly fresh interpreter (import timing, torchrun,
runs that are killed) start real subprocesses instead (``helpers.run_tool(..., fresh=True)``).

Protocol (one JSON object per line): the client writes a request
``{"script", "args", "cwd", "env", "stdout", "stderr"}``; the server answers ``{"pid"}`` when the child has
started and ``{"returncode"}`` when it has ended.
"""
import atexit
import json
import os
import runpy
import sys
import traceback

PRELOAD = ('torch', 'torchvision', 'timm', 'mmengine.runner', 'mmcv.ops', 'mmcv.transforms', 'mmpretrain.models',
           'mmpretrain.datasets', 'mmdet.models', 'mmdet.datasets', 'mmseg.models', 'mmseg.datasets')


def run_child(request: dict):
    """In the forked child: become the tool's process and run it; never returns."""
    os.setpgid(0, 0)  # the client kills the whole group on a timeout, the tool's own subprocesses with it
    os.chdir(request['cwd'])
    os.environ.clear()
    os.environ.update(request['env'])
    for fd, path, flags in ((0, os.devnull, os.O_RDONLY), (1, request['stdout'], os.O_WRONLY | os.O_CREAT),
                            (2, request['stderr'], os.O_WRONLY | os.O_CREAT)):
        file = os.open(path, flags, 0o644)
        os.dup2(file, fd)
        os.close(file)
    if 'OMP_NUM_THREADS' in os.environ:  # read by OpenMP when torch loaded, in the server: apply it here
        import torch
        torch.set_num_threads(int(os.environ['OMP_NUM_THREADS']))
    script = os.path.abspath(request['script'])
    sys.argv = [script, *request['args']]
    sys.path[0] = os.path.dirname(script)  # as `python script.py` sets it
    code = 0
    try:
        runpy.run_path(script, run_name='__main__')
    except SystemExit as exit_:
        code = exit_.code
    except BaseException:  # noqa: B036  (what an uncaught exception does to a script: traceback, status 1)
        traceback.print_exc()
        code = 1
    if code is None:
        code = 0
    elif not isinstance(code, int):  # sys.exit('message'): printed, status 1
        print(code, file=sys.stderr)
        code = 1
    # what interpreter exit does that a tool relies on (atexit: logging's flush, data-loader workers' end), without
    # tearing down the thousands of preloaded modules (2 s); a file a tool left open unflushed would lose its tail
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def serve():
    for name in PRELOAD:
        __import__(name)
    requests, replies = sys.stdin, sys.stdout
    replies.write(json.dumps({'ready': True}) + '\n')
    replies.flush()
    for line in requests:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            run_child(request)
        replies.write(json.dumps({'pid': pid}) + '\n')
        replies.flush()
        _, status = os.waitpid(pid, 0)
        replies.write(json.dumps({'returncode': os.waitstatus_to_exitcode(status)}) + '\n')
        replies.flush()


if __name__ == '__main__':
    serve()
