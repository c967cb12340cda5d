#!/usr/bin/env bash
# Run the test suite in the environment tools/install.sh set up (the active venv, else .venv/).
#   bash tools/run_tests.sh            # default suite (CPU, ~15 min on 2 cores)
#   bash tools/run_tests.sh -m slow    # the slow extras only
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${VIRTUAL_ENV:-$ROOT/.venv}/bin/python"
cd "$ROOT"
if [[ $# -eq 0 ]]; then
    set -- -m "not slow"
fi
exec "$PY" -m pytest tests -q -p no:cacheprovider --durations=15 "$@"
