#!/usr/bin/env bash
# Run the test suite in the environment tools/install.sh set up (the active venv, else .venv/).
#   bash tools/run_tests.sh            # the whole suite (CPU, ~10 min on 2 cores, two pytest-xdist workers)
#   bash tools/run_tests.sh -m "not slow"   # the quick subset (no end-to-end tool runs)
#   bash tools/run_tests.sh -k uvit    # any pytest arguments
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${VIRTUAL_ENV:-$ROOT/.venv}/bin/python"
cd "$ROOT"
exec "$PY" -m pytest tests -q -p no:cacheprovider -n 2 --dist loadfile --durations=15 "$@"
