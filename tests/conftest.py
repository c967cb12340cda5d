import os

import pytest
import torch

# The cores are shared by the tests (and by pytest-xdist workers, when run_tests.sh starts them): extra threads only
# add contention. Tools the tests start in subprocesses get the same share through OMP_NUM_THREADS.
WORKERS = int(os.environ.get('PYTEST_XDIST_WORKER_COUNT', '1'))
THREADS = max(1, min(2, (os.cpu_count() or 1) // WORKERS))
torch.set_num_threads(THREADS)
os.environ.setdefault('OMP_NUM_THREADS', str(THREADS))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
