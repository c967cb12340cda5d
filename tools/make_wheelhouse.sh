#!/usr/bin/env bash
# Download, on a machine with the package registry, everything sparsevit-mm needs besides PyTorch, for an offline
# install into an existing PyTorch environment (`bash tools/install.sh --offline WHEELHOUSE --use-current-torch`).
#
#   bash tools/make_wheelhouse.sh [--python 3.12] [--platform TAG]... [--with SPEC]... OUT_DIR
#
#   --python     the target environment's Python version (default 3.12)
#   --platform   a wheel platform tag of the target (default: manylinux 2_28 / 2_17 / 2014, x86_64); repeatable
#   --with       one more requirement to carry (e.g. --with onnxruntime==1.20.1); repeatable
#
# What goes in (33 MiB for Python 3.12; docs/install.md has the list and sizes): the OpenMMLab frameworks and
# their small pure-Python or binary dependencies as wheels for the target, mmcv's source archive (PyPI has no mmcv
# 2.1 wheels; install.sh builds it against the target's torch), and setuptools for mmcv's build and for mmengine's
# pkg_resources. What must already be in the target environment: torch, torchvision, numpy, scipy, matplotlib,
# Pillow, OpenCV (opencv-python or -headless): install.sh checks them first and names what is missing.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON_VERSION=3.12
PLATFORMS=()
EXTRA=()
OUT=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        --python) PYTHON_VERSION="$2"; shift 2 ;;
        --platform) PLATFORMS+=("$2"); shift 2 ;;
        --with) EXTRA+=("$2"); shift 2 ;;
        -h|--help) awk 'NR > 1 && !/^#/ {exit} NR > 1 {sub(/^# ?/, ""); print}' "${BASH_SOURCE[0]}"; exit 0 ;;
        -*) echo "make_wheelhouse.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
        *) [[ -z "$OUT" ]] || { echo "make_wheelhouse.sh: one OUT_DIR, got '$OUT' and '$1'" >&2; exit 2; }
           OUT="$1"; shift ;;
    esac
done
[[ -n "$OUT" ]] || { echo "make_wheelhouse.sh: give the output folder (see --help)" >&2; exit 2; }
[[ "$PYTHON_VERSION" =~ ^3\.[0-9]+$ ]] || { echo "make_wheelhouse.sh: --python wants e.g. 3.12, got '$PYTHON_VERSION'" >&2; exit 2; }
[[ ${#PLATFORMS[@]} -gt 0 ]] || PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64)
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
PY="${PYTHON:-python3}"
ABI="cp${PYTHON_VERSION/./}"

# The packages install.sh resolves (names only: what the environment has and satisfies them stays), then the
# versions carried. Pinned to the stack the test suite runs on; the frameworks' own pins are exact.
FRAMEWORKS=(mmengine==0.10.7 mmdet==3.3.0 mmsegmentation==1.2.2 mmpretrain==1.2.0)
DEPENDENCIES=(
    addict==2.4.0 yapf==0.43.0 platformdirs==4.14.9 termcolor==3.3.0 rich==15.0.0 markdown-it-py==4.3.0 mdurl==0.1.2
    pygments==2.21.0 pycocotools==2.0.11 shapely==2.2.0 six==1.17.0 terminaltables==3.1.10 tqdm==4.70.1
    prettytable==3.19.0 wcwidth==0.9.4 einops==0.8.2 importlib-metadata==10.2.0 zipp==4.1.2 mat4py==0.6.0
    modelindex==0.0.2 model-index==0.1.11 ordered-set==4.1.0 click==8.5.1 markdown==3.11.3 pyyaml==6.0.4
    ftfy==6.3.1 regex==2026.11.19 packaging==26.4 lazy-importer==0.1.0 truststore==0.10.5
    diffusers==0.42.1 filelock==4.3.2 requests==2.34.2 charset-normalizer==3.5.3 idna==3.20 urllib3==2.8.0
    certifi==2026.10.19.post1 safetensors==0.8.0 huggingface-hub==2.4.0 hf-xet==1.8.0 httpx2==2.16.2
    httpcore2==2.16.2 h11==0.16.0 anyio==4.16.0 fsspec==2026.9.0 typing-extensions==4.16.0
    timm==1.0.31
    pytest-timeout==2.4.0 pytest-xdist==3.8.0 execnet==2.1.2
)
# Build and runtime setuptools: mmcv 2.1's setup.py needs < 70; mmengine imports pkg_resources, gone in 82.
SETUPTOOLS=(setuptools==69.5.1 setuptools==80.9.0)

download() {  # binary wheels for the target; a package with no wheel is fetched as source and built to a wheel here
    local spec
    for spec in "$@"; do
        if ! "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYTHON_VERSION" \
                --implementation cp --abi "$ABI" --abi abi3 --abi none "${PLATFORMS[@]/#/--platform=}" \
                -d "$OUT" "$spec" 2>/dev/null; then
            echo "[wheelhouse] $spec has no wheel for Python $PYTHON_VERSION: building one from its source"
            "$PY" -m pip wheel -q --no-deps -w "$OUT" "$spec"
        fi
    done
}

echo "[wheelhouse] Python $PYTHON_VERSION ($ABI), platforms ${PLATFORMS[*]} -> $OUT"
download "${FRAMEWORKS[@]}" "${DEPENDENCIES[@]}" "${EXTRA[@]}"
mkdir -p "$OUT/build"  # kept apart so that a resolver never picks the build-time setuptools
"$PY" -m pip download -q --no-deps --only-binary=:all: -d "$OUT/build" "${SETUPTOOLS[0]}"
"$PY" -m pip download -q --no-deps --only-binary=:all: -d "$OUT" "${SETUPTOOLS[1]}"

"$PY" "$ROOT/tools/fetch_mmcv_source.py" 2.1.0 "$OUT"  # mmcv: PyPI has only its source for 2.1

# What install.sh resolves, and what it installs without its dependencies (the frameworks ask for opencv-python;
# an environment with opencv-python-headless satisfies them as well).
{
    printf '%s\n' "${DEPENDENCIES[@]%%==*}"
    for spec in "${EXTRA[@]}"; do printf '%s\n' "$spec"; done
} > "$OUT/requirements.txt"
printf '%s\n' "${FRAMEWORKS[@]}" > "$OUT/frameworks.txt"
echo "wheelhouse for Python $PYTHON_VERSION, made $(date -u +%F) from sparsevit-mm $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')" > "$OUT/README.txt"
SIZE=$(du -sm "$OUT" | cut -f1)
echo "[wheelhouse] $(ls "$OUT" | wc -l) files, ${SIZE} MiB in $OUT"
if [[ "$SIZE" -gt 40 ]]; then
    echo "[wheelhouse] warning: more than 40 MiB; the largest files:" >&2
    ls -S -l "$OUT" | head -n 6 >&2
fi
