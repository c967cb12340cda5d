#!/usr/bin/env bash
# Set up everything sparsevit-mm needs, on a fresh machine or again on one already set up.
#
#   bash tools/install.sh            # creates .venv/ at the repo root (or uses the active venv)
#
# mmcv 2.1.x (required by mmdet 3.3 / mmseg 1.2) is published only as source. We build it once against the
# installed torch, with its compiled ops, into a wheel cache outside the repo and reuse that wheel afterwards,
# so a second run takes a minute instead of ~30 (2 CPU cores). On a machine with CUDA the same build compiles
# the CUDA ops (the cache key includes the torch build and CUDA availability).
#
# Environment knobs:
#   SPARSEVIT_WHEEL_CACHE   wheel cache dir (default ~/.cache/sparsevit_mm/wheels)
#   SPARSEVIT_EXTRAS        extra pip specs, e.g. "xformers" on a CUDA machine (optional, never required)
#   MAX_JOBS                parallel compile jobs for mmcv (default: number of cores)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${SPARSEVIT_WHEEL_CACHE:-$HOME/.cache/sparsevit_mm/wheels}"
TORCH_SPEC="torch==2.14.1"
TORCHVISION_SPEC="torchvision==0.29.1"
MMCV_VERSION="2.1.0"

log() { printf '\n[install] %s\n' "$*"; }

# 1. The Python environment: the active venv if there is one, else .venv/ at the repo root.
if [[ -n "${VIRTUAL_ENV:-}" ]]; then
    PY="$VIRTUAL_ENV/bin/python"
    log "using the active virtualenv $VIRTUAL_ENV"
else
    if [[ ! -x "$ROOT/.venv/bin/python" ]]; then
        log "creating $ROOT/.venv"
        python3 -m venv "$ROOT/.venv"
    fi
    PY="$ROOT/.venv/bin/python"
fi
# The machine's pip config lists local indexes that lack most packages; their per-package warnings are noise.
pip_filtered() { "$PY" -m pip --disable-pip-version-check "$@" 2> >(grep -v 'is ignored: it is neither a file' >&2); }
PIP=(pip_filtered)

# 2. Build tooling. Every install below goes through one constraints file: torch 2.14 needs setuptools>=77.0.3,
#    and mmengine's `mmpretrain::` / `mmdet::` base-config inheritance imports pkg_resources, which setuptools 82
#    removed, so the runtime range is [77.0.3, 81). (mmcv's own build wants setuptools<70; see step 5.)
CONSTRAINTS="$(mktemp)"
WORK_DIRS=("$CONSTRAINTS")
trap 'rm -rf "${WORK_DIRS[@]}"' EXIT
cat > "$CONSTRAINTS" <<'CEOF'
setuptools>=77.0.3,<81
torch==2.14.1
torchvision==0.29.1
CEOF
PIP_INSTALL=("${PIP[@]}" install -q -c "$CONSTRAINTS")
log "build tooling"
"${PIP_INSTALL[@]}" --upgrade "pip<26" setuptools wheel ninja

# 3. torch / torchvision (taken from the local disk where the machine provides them).
if ! "$PY" -c "import torch, torchvision, sys; sys.exit(0 if torch.__version__.split('+')[0]=='2.14.1' else 1)" 2>/dev/null; then
    log "installing $TORCH_SPEC $TORCHVISION_SPEC"
    "${PIP_INSTALL[@]}" "$TORCH_SPEC" "$TORCHVISION_SPEC"
fi

# 4. mmengine (pure Python) before mmcv: mmcv's build imports it indirectly through its version checks.
"${PIP_INSTALL[@]}" "mmengine==0.10.7" "numpy>=1.26" pillow pyyaml packaging

# 5. mmcv with compiled ops: a cached wheel, or a one-time source build.
TAG=$("$PY" - <<'PYEOF'
import sys, torch
cuda = 'cu' + torch.version.cuda.replace('.', '') if (torch.cuda.is_available() and torch.version.cuda) else 'cpu'
print(f"torch{torch.__version__.split('+')[0]}-{cuda}-py{sys.version_info.major}{sys.version_info.minor}")
PYEOF
)
WHEEL_DIR="$CACHE/$TAG"
mkdir -p "$WHEEL_DIR"
have_mmcv() {
    "$PY" - <<'PYEOF' 2>/dev/null
import importlib.metadata as md, sys
from mmcv.ops import nms, roi_align  # noqa: F401  (fails if the compiled ops are missing)
sys.exit(0 if md.version('mmcv') == '2.1.0' else 1)
PYEOF
}
if have_mmcv; then
    log "mmcv $MMCV_VERSION with compiled ops already installed"
else
    WHEEL=$(ls "$WHEEL_DIR"/mmcv-"$MMCV_VERSION"-*.whl 2>/dev/null | head -n1 || true)
    if [[ -z "$WHEEL" ]]; then
        log "building mmcv $MMCV_VERSION with ops for $TAG (one time, ~30 min on 2 cores)"
        BUILD=$(mktemp -d)
        WORK_DIRS+=("$BUILD")
        # `pip download` of an sdist runs its metadata step (which imports torch and pkg_resources); fetch the
        # tarball from the index directly instead.
        "$PY" - "$BUILD" "$MMCV_VERSION" <<'PYEOF'
import re, sys, urllib.request
out, version = sys.argv[1], sys.argv[2]
page = urllib.request.urlopen('https://pypi.org/simple/mmcv/', timeout=120).read().decode()
url = re.search(r'href="([^"]*/mmcv-%s\.tar\.gz)[^"]*"' % re.escape(version), page).group(1)
urllib.request.urlretrieve(url, f'{out}/mmcv-{version}.tar.gz')
PYEOF
        tar -xzf "$BUILD"/mmcv-"$MMCV_VERSION".tar.gz -C "$BUILD"
        SRC="$BUILD/mmcv-$MMCV_VERSION"
        # torch 2.14's headers need C++20; mmcv 2.1 hard-codes c++14/17.
        sed -i -e 's/c++14/c++20/g' -e 's/c++17/c++20/g' "$SRC/setup.py"
        # mmcv 2.1's setup.py needs setuptools<70 to build; torch's runtime pin is restored right after.
        "${PIP[@]}" install -q "setuptools<70" 2>&1 | grep -v "requires setuptools" || true
        (cd "$SRC" && MMCV_WITH_OPS=1 MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
            "${PIP[@]}" wheel --no-build-isolation --no-deps -w "$WHEEL_DIR" . )
        "${PIP_INSTALL[@]}" setuptools
        WHEEL=$(ls "$WHEEL_DIR"/mmcv-"$MMCV_VERSION"-*.whl | head -n1)
    else
        log "reusing cached $WHEEL"
    fi
    "${PIP[@]}" install -q --no-deps --force-reinstall "$WHEEL"
    "${PIP_INSTALL[@]}" addict yapf rich termcolor
    have_mmcv || { echo "mmcv was installed but its compiled ops do not import" >&2; exit 1; }
fi

# 6. The OpenMMLab frameworks, timm, test tools, and this package (editable).
log "frameworks and sparsevit_mm"
"${PIP_INSTALL[@]}" -e "$ROOT[tests]" ${SPARSEVIT_EXTRAS:-}

log "checking the stack"
"$PY" - <<'PYEOF'
import torch, mmengine, mmcv, mmdet, mmseg, mmpretrain, timm, sparsevit_mm
from mmcv.ops import roi_align  # noqa: F401
print('torch', torch.__version__, '| mmengine', mmengine.__version__, '| mmcv', mmcv.__version__,
      '| mmdet', mmdet.__version__, '| mmseg', mmseg.__version__, '| mmpretrain', mmpretrain.__version__,
      '| timm', timm.__version__)
PYEOF
log "done. Activate with: source ${VIRTUAL_ENV:-$ROOT/.venv}/bin/activate"
