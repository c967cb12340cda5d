#!/usr/bin/env bash
# Run the test suite in the environment tools/install.sh set up (the active venv, else .venv/).
#   bash tools/run_tests.sh            # the whole suite (CPU, ~16 min on 2 cores)
#   bash tools/run_tests.sh -k uvit    # any pytest arguments
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${VIRTUAL_ENV:-$ROOT/.venv}/bin/python"
cd "$ROOT"
exec "$PY" -m pytest tests -q -p no:cacheprovider --durations=15 "$@"
