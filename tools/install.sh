#!/usr/bin/env bash
# Set up everything sparsevit-mm needs, on a fresh machine or again on one already set up.
#
#   bash tools/install.sh            # creates .venv/ at the repo root (or uses the active venv)
#   bash tools/install.sh --offline WHEELHOUSE --use-current-torch [--ops-in-background]
#                                    # into the active environment, keeping its torch, from a folder made by
#                                    # tools/make_wheelhouse.sh (no network; docs/install.md)
#
# mmcv 2.1.x (required by mmdet 3.3 / mmseg 1.2) is published only as source. We build it once against the
# installed torch, with its compiled ops, into a wheel cache outside the repo and reuse that wheel afterwards,
# so a second run takes a minute instead of ~30 (2 CPU cores). On a machine with CUDA the same build compiles
# the CUDA ops for the local GPU (the cache key includes the torch build and CUDA availability).
#
# Environment knobs:
#   SPARSEVIT_WHEEL_CACHE   wheel cache dir (default ~/.cache/sparsevit_mm/wheels)
#   SPARSEVIT_EXTRAS        extra pip specs, e.g. "xformers" on a CUDA machine (optional, never required)
#   MAX_JOBS                parallel compile jobs for mmcv (default: number of cores)
#   TORCH_CUDA_ARCH_LIST    GPU architectures of mmcv's CUDA ops (default: the local GPU's, e.g. 9.0)
#   PYTHON                  the interpreter of --offline when no virtualenv is active (default: python3)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${SPARSEVIT_WHEEL_CACHE:-$HOME/.cache/sparsevit_mm/wheels}"
TORCH_SPEC="torch==2.14.1"
TORCHVISION_SPEC="torchvision==0.29.1"
MMCV_VERSION="2.1.0"
OLDEST_TORCH="2.11"  # the oldest torch the code is tested on (docs/install.md)
OFFLINE=""
USE_CURRENT_TORCH=""
OPS_IN_BACKGROUND=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        --offline) [[ $# -ge 2 ]] || { echo "install.sh: --offline wants the wheelhouse folder" >&2; exit 2; }
                   OFFLINE="$2"; shift 2 ;;
        --use-current-torch) USE_CURRENT_TORCH=1; shift ;;
        --ops-in-background) OPS_IN_BACKGROUND=1; shift ;;
        -h|--help) awk 'NR > 1 && !/^#/ {exit} NR > 1 {sub(/^# ?/, ""); print}' "${BASH_SOURCE[0]}"; exit 0 ;;
        *) echo "install.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
done
if [[ -n "$OFFLINE" && -z "$USE_CURRENT_TORCH" ]]; then
    echo "install.sh: --offline installs into an environment that has torch already: add --use-current-torch" >&2
    exit 2
fi
if [[ -n "$USE_CURRENT_TORCH" && -z "$OFFLINE" ]]; then
    echo "install.sh: --use-current-torch goes with --offline WHEELHOUSE (online, install.sh installs $TORCH_SPEC)" >&2
    exit 2
fi
if [[ -n "$OPS_IN_BACKGROUND" && -z "$OFFLINE" ]]; then
    echo "install.sh: --ops-in-background goes with --offline" >&2
    exit 2
fi

log() { printf '\n[install] %s\n' "$*"; }

# Shared by both routes: the local torch build's cache tag, and mmcv's source patched for it.
torch_tag() {
    "$PY" - <<'PYEOF'
import sys, torch
cuda = 'cu' + torch.version.cuda.replace('.', '') if (torch.cuda.is_available() and torch.version.cuda) else 'cpu'
print(f"torch{torch.__version__.split('+')[0]}-{cuda}-py{sys.version_info.major}{sys.version_info.minor}")
PYEOF
}
have_mmcv() {  # mmcv 2.1.0 with its compiled ops (not mmcv-lite)
    "$PY" - <<'PYEOF' 2>/dev/null
import importlib.metadata as md, sys
from mmcv.ops import nms, roi_align  # noqa: F401  (fails if the compiled ops are missing)
sys.exit(0 if md.version('mmcv') == '2.1.0' else 1)
PYEOF
}
patch_mmcv_source() {  # torch >= 2.14's headers need C++20; mmcv 2.1 hard-codes c++14 / c++17 (nvcc 13 takes 20)
    sed -i -e 's/c++14/c++20/g' -e 's/c++17/c++20/g' "$1/setup.py"
}
use_pip_cuda_headers() {
    # torch's CUDA wheels bring the CUDA libraries as nvidia-* packages whose headers (cusparse.h, cublas_v2.h, ...)
    # lie beside them, not in CUDA_HOME; torch's own headers include them, so the compilers must see them
    # (without: "fatal error: cusparse.h: No such file or directory" with an nvcc-only CUDA_HOME)
    local dirs
    dirs=$("$PY" - <<'PYEOF'
import glob, os, site
roots = [p for p in site.getsitepackages() if os.path.isdir(os.path.join(p, 'nvidia'))]
print(':'.join(d for root in roots for d in sorted(glob.glob(os.path.join(root, 'nvidia', '*', 'include')))))
PYEOF
)
    if [[ -n "$dirs" ]]; then
        export CPATH="$dirs${CPATH:+:$CPATH}"
        export LIBRARY_PATH="${dirs//include/lib}${LIBRARY_PATH:+:$LIBRARY_PATH}"
    fi
}

if [[ -n "$OFFLINE" ]]; then
    # ------------------------------------------------------------------------------------------------------------
    # Offline, into the active environment, keeping its torch (docs/install.md, "offline / existing PyTorch").
    # ------------------------------------------------------------------------------------------------------------
    WH="$(cd "$OFFLINE" 2>/dev/null && pwd)" || { echo "install.sh: wheelhouse '$OFFLINE' is not a folder" >&2; exit 2; }
    for f in requirements.txt frameworks.txt "mmcv-$MMCV_VERSION.tar.gz"; do
        [[ -e "$WH/$f" ]] || { echo "install.sh: $WH has no $f: make it with tools/make_wheelhouse.sh" >&2; exit 2; }
    done
    PY="${VIRTUAL_ENV:+$VIRTUAL_ENV/bin/python}"
    PY="${PY:-$(command -v "${PYTHON:-python3}")}"
    log "offline install into $("$PY" -c 'import sys; print(sys.prefix)') ($("$PY" --version)) from $WH"
    OFFLINE_PIP=("$PY" -m pip --disable-pip-version-check install -q --no-index --find-links "$WH")

    # 1. What the wheelhouse does not carry must be there, and torch must be one we are tested on.
    "$PY" - "$OLDEST_TORCH" <<'PYEOF' || exit 1
import importlib, sys
missing = []
for module, package in [('torch', 'torch'), ('torchvision', 'torchvision'), ('numpy', 'numpy'), ('scipy', 'scipy'),
                        ('matplotlib', 'matplotlib'), ('PIL', 'Pillow'), ('cv2', 'opencv-python(-headless)')]:
    try:
        importlib.import_module(module)
    except ImportError as error:
        missing.append(f'{package} ({error})')
if missing:
    sys.exit('install.sh: this environment lacks ' + ', '.join(missing) + '; install them first, or carry them '
             'in the wheelhouse with make_wheelhouse.sh --with NAME')
import torch
from packaging.version import Version
if Version(torch.__version__.split('+')[0]) < Version(sys.argv[1]):
    sys.exit(f'install.sh: torch {torch.__version__} is older than {sys.argv[1]}, the oldest sparsevit-mm is tested on')
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'
print(f'[install] keeping torch {torch.__version__} (CUDA {torch.version.cuda}, {gpu})')
PYEOF

    # 2. Dependencies by name: what the environment has and satisfies them stays as it is.
    log "dependencies from the wheelhouse"
    "${OFFLINE_PIP[@]}" -r "$WH/requirements.txt"
    if ! "$PY" -W ignore -c "import pkg_resources" 2>/dev/null; then  # mmengine imports it; setuptools 82 removed it
        log "setuptools<81 (this environment's setuptools has no pkg_resources, which mmengine imports)"
        "${OFFLINE_PIP[@]}" "setuptools<81"
    fi
    # 3. The frameworks without their dependencies: they ask for opencv-python by name, and -headless serves too.
    "${OFFLINE_PIP[@]}" --no-deps -r "$WH/frameworks.txt"

    # 4. mmcv: without compiled ops first (seconds), so that mmpretrain and mmseg work at once.
    TAG=$(torch_tag)
    SRC_ROOT="$CACHE/src-$TAG"
    SRC="$SRC_ROOT/mmcv-$MMCV_VERSION"
    rm -rf "$SRC_ROOT" && mkdir -p "$SRC_ROOT" "$CACHE/$TAG"
    tar -xzf "$WH/mmcv-$MMCV_VERSION.tar.gz" -C "$SRC_ROOT"
    patch_mmcv_source "$SRC"
    # mmcv 2.1's setup.py needs setuptools<70: the wheelhouse's copy goes on PYTHONPATH for its builds only.
    BUILD_TOOLS="$SRC_ROOT/build-tools"
    "$PY" -m pip --disable-pip-version-check install -q --no-index --no-deps --target "$BUILD_TOOLS" \
        "$WH"/build/setuptools-*.whl
    if have_mmcv; then
        log "mmcv $MMCV_VERSION with compiled ops already installed"
    else
        log "mmcv $MMCV_VERSION without compiled ops (mmcv-lite)"
        (cd "$SRC" && PYTHONPATH="$BUILD_TOOLS" MMCV_WITH_OPS=0 "$PY" -m pip --disable-pip-version-check \
            install -q --no-deps --no-build-isolation --no-index .)
    fi

    # 5. sparsevit_mm itself (editable; its dependencies are in place).
    "$PY" -m pip --disable-pip-version-check install -q --no-deps --no-build-isolation --no-index -e "$ROOT"
    "$PY" - <<'PYEOF'
import torch, mmengine, mmcv, mmdet, mmseg, mmpretrain, timm, sparsevit_mm
print('[install] torch', torch.__version__, '| mmengine', mmengine.__version__, '| mmcv', mmcv.__version__,
      '| mmdet', mmdet.__version__, '| mmseg', mmseg.__version__, '| mmpretrain', mmpretrain.__version__,
      '| timm', timm.__version__)
PYEOF

    # 6. mmcv's compiled ops (mmdet's RoI and NMS ops), for the local GPU only.
    LOG="$CACHE/mmcv-ops-$TAG.log"
    build_ops() {  # each step's failure ends it (explicitly: it also runs where `set -e` is ignored)
        local arch jobs wheel
        arch="${TORCH_CUDA_ARCH_LIST:-$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability()) if torch.cuda.is_available() else print('')")}"
        jobs="${MAX_JOBS:-$(nproc)}"
        wheel=$(ls "$CACHE/$TAG"/mmcv-"$MMCV_VERSION"-*.whl 2>/dev/null | head -n1 || true)
        if [[ -z "$wheel" ]]; then
            echo "[ops] building mmcv's ops for ${arch:-the CPU} with $jobs jobs ($(date -u +%T))"
            [[ -z "$arch" ]] || use_pip_cuda_headers
            (cd "$SRC" && PYTHONPATH="$BUILD_TOOLS" MMCV_WITH_OPS=1 MAX_JOBS="$jobs" TORCH_CUDA_ARCH_LIST="$arch" \
                FORCE_CUDA="$([[ -n "$arch" ]] && echo 1 || echo 0)" \
                "$PY" -m pip --disable-pip-version-check wheel --no-deps --no-build-isolation --no-index \
                -w "$CACHE/$TAG" .) || return 1
            wheel=$(ls "$CACHE/$TAG"/mmcv-"$MMCV_VERSION"-*.whl | head -n1) || return 1
        fi
        "$PY" -m pip --disable-pip-version-check uninstall -q -y mmcv-lite 2>/dev/null || true
        "$PY" -m pip --disable-pip-version-check install -q --no-deps --force-reinstall --no-index "$wheel" || return 1
        have_mmcv || return 1
        echo "[ops] mmcv's compiled ops import ($(date -u +%T))"
    }
    if have_mmcv; then
        log "done: the whole stack is installed"
    elif [[ -n "$OPS_IN_BACKGROUND" ]]; then
        (build_ops > "$LOG" 2>&1 && echo "[ops] done" >> "$LOG" || echo "[ops] FAILED (exit $?)" >> "$LOG") &
        log "mmcv's compiled ops are building in the background (pid $!): tail -f $LOG
    mmpretrain and mmseg models work now; mmdet's detectors need the ops ('[ops] done' in the log)"
    else
        log "building mmcv's compiled ops (log: $LOG)"
        build_ops 2>&1 | tee "$LOG" || { echo "install.sh: mmcv's ops did not build; the end of $LOG says why" >&2; exit 1; }
        log "done: the whole stack is installed"
    fi
    exit 0
fi

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
TAG=$(torch_tag)
WHEEL_DIR="$CACHE/$TAG"
mkdir -p "$WHEEL_DIR"
if have_mmcv; then
    log "mmcv $MMCV_VERSION with compiled ops already installed"
else
    WHEEL=$(ls "$WHEEL_DIR"/mmcv-"$MMCV_VERSION"-*.whl 2>/dev/null | head -n1 || true)
    if [[ -z "$WHEEL" ]]; then
        log "building mmcv $MMCV_VERSION with ops for $TAG (one time, ~30 min on 2 cores)"
        BUILD=$(mktemp -d)
        WORK_DIRS+=("$BUILD")
        "$PY" "$ROOT/tools/fetch_mmcv_source.py" "$MMCV_VERSION" "$BUILD"
        tar -xzf "$BUILD"/mmcv-"$MMCV_VERSION".tar.gz -C "$BUILD"
        SRC="$BUILD/mmcv-$MMCV_VERSION"
        patch_mmcv_source "$SRC"
        [[ "$TAG" == *-cpu-* ]] || use_pip_cuda_headers
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
