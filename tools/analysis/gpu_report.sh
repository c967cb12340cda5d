#!/usr/bin/env bash
# Every GPU number of the docs in one run, written to one Markdown report (docs/benchmarks.md, "GPU report").
#
#   bash tools/analysis/gpu_report.sh OUT_DIR                        # on a GPU: about 8 minutes
#   bash tools/analysis/gpu_report.sh OUT_DIR --device cpu --quick   # the same parts, tiny, here (~2 minutes)
#
#   --device cuda|cpu   where to measure (default cuda)
#   --quick             one short round per setting, small batches and sizes (a check that every part runs)
#   --budget SECONDS    the whole run's time limit (default 480; 300 with --quick); parts past it are listed as
#                       not run, and a part that overruns its own limit is stopped
#   --only PATTERN      run only the parts whose title matches this grep -E pattern
#   --wait-for-ops LOG  mmcv's ops are building in the background (install.sh --offline --ops-in-background, its
#                       log): the Mask R-CNN parts wait for '[ops] done' (or '[ops] FAILED') in it, within the budget
#
# Parts, in this order (the most asked-for numbers first, so that a short run still has them):
#   1. the CUDA tests (pytest -m cuda);
#   2. inference, fp16, dense vs keep 0.7: DeiT-S / DeiT-B at batch 256 and 1, Swin-T / ConvNeXt-T at batch 128
#      and 1, each eager, torch.compile and torch.compile with CUDA graphs (benchmark.py --compile --cuda-graphs);
#   3. whole test_step, fp16, batch 1 and 8: Segmenter and Mask R-CNN with DynamicViT-S / -B;
#   4. training steps (time and peak memory, dense vs sparse): Mask R-CNN and Segmenter with DynamicViT-S / -B.
# OUT_DIR gets report.md (rewritten after every part, so a run cut short still has one), each part's log under
# logs/ and each benchmark's numbers as JSON. A part that fails is reported with the end of its log, and the
# run goes on.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PY="${VIRTUAL_ENV:+$VIRTUAL_ENV/bin/python}"
PY="${PY:-$(command -v "${PYTHON:-python3}")}"
DEVICE=cuda
QUICK=""
BUDGET=""
ONLY=""
OPS_LOG=""
OUT=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        --device) DEVICE="$2"; shift 2 ;;
        --quick) QUICK=1; shift ;;
        --budget) BUDGET="$2"; shift 2 ;;
        --only) ONLY="$2"; shift 2 ;;
        --wait-for-ops) OPS_LOG="$2"; shift 2 ;;
        -h|--help) awk 'NR > 1 && !/^#/ {exit} NR > 1 {sub(/^# ?/, ""); print}' "${BASH_SOURCE[0]}"; exit 0 ;;
        -*) echo "gpu_report.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
        *) [[ -z "$OUT" ]] || { echo "gpu_report.sh: one OUT_DIR, got '$OUT' and '$1'" >&2; exit 2; }
           OUT="$1"; shift ;;
    esac
done
[[ -n "$OUT" ]] || { echo "gpu_report.sh: give the output folder (see --help)" >&2; exit 2; }
[[ "$DEVICE" == cuda || "$DEVICE" == cpu ]] || { echo "gpu_report.sh: --device is cuda or cpu, got '$DEVICE'" >&2; exit 2; }
BUDGET="${BUDGET:-$([[ -n "$QUICK" ]] && echo 300 || echo 480)}"
[[ "$BUDGET" =~ ^[0-9]+$ && "$BUDGET" -gt 0 ]] || { echo "gpu_report.sh: --budget wants seconds, got '$BUDGET'" >&2; exit 2; }
if [[ "$DEVICE" == cuda ]] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_report.sh: torch sees no CUDA device here; for a check on the CPU: --device cpu --quick" >&2
    exit 2
fi
mkdir -p "$OUT/logs"
OUT="$(cd "$OUT" && pwd)"
ROWS="$OUT/parts.tsv"
: > "$ROWS"
rm -f "$OUT/environment.json"
START=$(date +%s)
cd "$ROOT"

write_report() {
    "$PY" - "$OUT" "$DEVICE" "${QUICK:-0}" "$BUDGET" <<'PYEOF'
import datetime, json, os, platform, subprocess, sys
out, device, quick, budget = sys.argv[1], sys.argv[2], sys.argv[3] == '1', sys.argv[4]
lines = ['# sparsevit-mm GPU report' if device == 'cuda' else '# sparsevit-mm report (CPU check run)', '']
env = os.path.join(out, 'environment.json')
if not os.path.exists(env):
    import torch
    info = dict(device=torch.cuda.get_device_name() if device == 'cuda' else platform.processor() or 'CPU',
                torch=torch.__version__, cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                python=platform.python_version(), threads=torch.get_num_threads(),
                date=datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC'))
    try:
        info['commit'] = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], capture_output=True, text=True,
                                        check=True).stdout.strip()
    except Exception:  # noqa: BLE001
        info['commit'] = '?'
    if device == 'cuda':
        try:
            info['driver'] = subprocess.run(['nvidia-smi', '--query-gpu=driver_version', '--format=csv,noheader'],
                                            capture_output=True, text=True).stdout.strip()
        except OSError:
            info['driver'] = '?'
    json.dump(info, open(env, 'w'), indent=1)
info = json.load(open(env))
try:  # read at every rewrite: the ops may finish building during the run (--wait-for-ops)
    from mmcv.ops import roi_align  # noqa: F401
    info['mmcv_ops'] = 'compiled ops present'
except Exception as error:  # noqa: BLE001  (whatever the cause, it is reported)
    info['mmcv_ops'] = f'no compiled ops ({type(error).__name__}: {str(error)[:120]})'
lines += [f"- device: **{info['device']}**" + (f" (driver {info['driver']})" if info.get('driver') else ''),
          f"- torch {info['torch']}, CUDA {info['cuda']}, cuDNN {info['cudnn']}, Python {info['python']}, "
          f"{info['threads']} CPU threads", f"- mmcv: {info['mmcv_ops']}",
          f"- sparsevit-mm commit {info['commit']}, {info['date']}" + (', --quick' if quick else '') +
          f', time budget {budget} s', '']
rows = [line.rstrip('\n').split('\t') for line in open(os.path.join(out, 'parts.tsv')) if line.strip()]
lines += ['## Parts', '', '| part | status | seconds | command |', '|---|---|---|---|']
for part, title, status, seconds, log, result, command in rows:
    lines.append(f'| {title} | {status} | {seconds} | `{command}` |')
lines.append('')

def ratio(x):
    return f'{x:.2f}x' if isinstance(x, (int, float)) else '-'

inference, whole, training = [], [], []
for part, title, status, seconds, log, result, command in rows:
    if result == '-' or not os.path.exists(result):
        continue
    results = json.load(open(result))['results']
    ratios = [k for k in results if k[0].isdigit()]
    if not ratios:
        continue
    dense, sparse = results[ratios[0]], results[ratios[-1]]
    if 'seconds_per_step' in dense:
        training.append(f"| {title} | {dense['seconds_per_step']:.3f} | {sparse['seconds_per_step']:.3f} | "
                        f"{ratio(sparse['time_ratio'])} | {dense['peak_mib']:.0f} | {sparse['peak_mib']:.0f} | "
                        f"{ratio(sparse['peak_ratio'])} |")
        continue
    cells = [f"{dense['images_per_s']:.1f} / {sparse['images_per_s']:.1f} ({ratio(sparse['speedup'])})"]
    for backend in ('compiled', 'cuda-graphs'):
        if backend in results:
            b_dense, b_sparse = results[backend][ratios[0]], results[backend][ratios[-1]]
            cells.append(f"{b_dense['images_per_s']:.1f} / {b_sparse['images_per_s']:.1f} "
                         f"({ratio(b_sparse['speedup'])})")
        else:
            cells.append('-')
    row = f"| {title} | {ratio(sparse['flops_speedup'])} | " + ' | '.join(cells) + ' |'
    (whole if 'seconds_by_part' in dense else inference).append(row)
if inference:
    lines += ['## Inference (images/s, dense / keep 0.7, and the speed-up)', '',
              '| model | FLOPs speed-up | eager | torch.compile | CUDA graphs |', '|---|---|---|---|---|',
              *inference, '']
if whole:
    lines += ['## Whole test_step (images/s, dense / keep 0.7, and the speed-up)', '',
              '| model | FLOPs speed-up | eager | torch.compile | CUDA graphs |', '|---|---|---|---|---|', *whole, '']
if training:
    lines += ['## Training step (dense vs sparse, same weights)', '',
              '| model | s / step dense | s / step sparse | time vs dense | peak MiB dense | peak MiB sparse | '
              'memory vs dense |', '|---|---|---|---|---|---|---|', *training, '']
lines += ['## Logs', '']
for part, title, status, seconds, log, result, command in rows:
    if not os.path.exists(log):
        continue
    text = open(log, errors='replace').read().replace('\r', '\n')
    keep = [line for line in text.splitlines() if line.strip() and not line.lstrip().startswith(
        ('warm-up:', 'benchmark:', 'rounds:')) and ' - mmengine - ' not in line]
    tail = keep[-40:] if status.startswith('ok') else keep[-25:]
    lines += [f'### {title}: {status}', '', f'`{command}`', '', '```', *tail, '```', '']
open(os.path.join(out, 'report.md'), 'w').write('\n'.join(lines))
PYEOF
}

# run_part PART TITLE LIMIT_SECONDS COMMAND... (a benchmark gets --json added)
run_part() {
    local part="$1" title="$2" limit="$3"
    shift 3
    local slug log result elapsed remaining status rc started
    if [[ -n "$ONLY" ]] && ! grep -qE "$ONLY" <<< "$title"; then
        return
    fi
    slug=$(tr -c 'A-Za-z0-9.-' '_' <<< "$title" | sed 's/_*$//')
    log="$OUT/logs/$slug.log"
    result="-"
    local command=("$@")
    if [[ "${command[*]}" == *benchmark.py* ]]; then
        result="$OUT/$slug.json"
        rm -f "$result"
        command+=(--json "$result")
    fi
    if [[ -n "$OPS_LOG" && "$title" == *"Mask R-CNN"* ]] && ! grep -q '^\[ops\] \(done\|FAILED\)' "$OPS_LOG" 2>/dev/null; then
        echo "[report] waiting for mmcv's ops ($OPS_LOG)"
        while ! grep -q '^\[ops\] \(done\|FAILED\)' "$OPS_LOG" 2>/dev/null && \
                [[ $(( BUDGET - $(date +%s) + START )) -gt 30 ]]; do
            sleep 5
        done
    fi
    elapsed=$(( $(date +%s) - START ))
    remaining=$(( BUDGET - elapsed ))
    if [[ "$remaining" -lt 15 ]]; then
        status="not run: the ${BUDGET} s budget was spent"
        printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$part" "$title" "$status" 0 "$log" "$result" "${command[*]}" >> "$ROWS"
        return
    fi
    [[ "$limit" -le "$remaining" ]] || limit="$remaining"
    echo "[report] $title (at most ${limit} s)"
    started=$(date +%s)
    timeout --kill-after=10 "$limit" "${command[@]}" > "$log" 2>&1
    rc=$?
    case "$rc" in
        0) status="ok" ;;
        124|137) status="stopped at its ${limit} s limit" ;;
        *) status="FAILED (exit $rc)" ;;
    esac
    [[ "$rc" -eq 0 || ! -e "$result" ]] || status="$status, partial"
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$part" "$title" "$status" "$(( $(date +%s) - started ))" "$log" \
        "$result" "${command[*]}" >> "$ROWS"
    echo "[report]   $status"
    write_report
}

BENCH=("$PY" tools/analysis/benchmark.py)
DEIT_S=configs/dynamicvit/dynamicvit-deit-small_r0.7_8xb128-30e_in1k.py
DEIT_B=configs/dynamicvit/dynamicvit-deit-base_r0.7_8xb128-30e_in1k.py
SWIN_T=configs/dynamic_swin/dynamic-swin-t_r0.7_8xb128x4-120e_in1k.py
CONVNEXT_T=configs/dynamic_convnext/dynamic-convnext-t_r0.7_8xb128x4-120e_in1k.py
SEGMENTER_S=configs/dynamicvit/segmenter_dynamicvit-deit-small-r0.7_mask_8xb1-160k_ade20k-512x512.py
SEGMENTER_B=configs/dynamicvit/segmenter_dynamicvit-deit-base-r0.7_mask_8xb1-160k_ade20k-512x512.py
MASK_RCNN_S=configs/dynamicvit/mask-rcnn_dynamicvit-deit-small-r0.7_simple-fpn_1x_coco.py
MASK_RCNN_B=configs/dynamicvit/mask-rcnn_dynamicvit-deit-base-r0.7_simple-fpn_1x_coco.py

if [[ -n "$QUICK" ]]; then
    TIMING=(--rounds 1 --iters 1 --warmup 0)
    QUICK_LIMIT=300  # a check, not a measurement: on a loaded machine (a test run beside it) parts take longer
else
    TIMING=(--rounds 5 --iters 10 --warmup 3)
fi
if [[ "$DEVICE" == cuda ]]; then
    INFER=(--device cuda --fp16 --compile --cuda-graphs)
    WHOLE=(--device cuda --fp16)
    TRAIN=(--device cuda --fp16)
else  # the same code paths on the CPU: float32, and compilation captured only (the eager backend)
    INFER=(--device cpu --compile --compile-backend eager)
    WHOLE=(--device cpu)
    TRAIN=(--device cpu)
fi

echo "[report] $OUT/report.md ($DEVICE${QUICK:+, quick}, budget ${BUDGET} s)"
run_part tests "CUDA tests (pytest -m cuda)" 240 "$PY" -m pytest tests -m cuda -q -p no:cacheprovider -rs

if [[ -n "$QUICK" ]]; then
    run_part inference "DeiT-S batch 2" "$QUICK_LIMIT" \
        "${BENCH[@]}" "$DEIT_S" "${INFER[@]}" --batch-size 2 "${TIMING[@]}"
    run_part whole "Segmenter DynamicViT-S batch 1" "$QUICK_LIMIT" "${BENCH[@]}" "$SEGMENTER_S" "${WHOLE[@]}" \
        --batch-size 1 --shape 256 256 "${TIMING[@]}"
    run_part whole "Mask R-CNN DynamicViT-S batch 1" "$QUICK_LIMIT" "${BENCH[@]}" "$MASK_RCNN_S" "${WHOLE[@]}" \
        --batch-size 1 --shape 192 288 "${TIMING[@]}"
    run_part training "train Segmenter DynamicViT-S" "$QUICK_LIMIT" \
        "${BENCH[@]}" "$SEGMENTER_S" --train "${TRAIN[@]}" \
        --batch-size 1 --shape 128 128 "${TIMING[@]}"
    run_part training "train Mask R-CNN DynamicViT-S" "$QUICK_LIMIT" \
        "${BENCH[@]}" "$MASK_RCNN_S" --train "${TRAIN[@]}" \
        --batch-size 1 --shape 128 192 "${TIMING[@]}"
else
    run_part inference "DeiT-S batch 256" 150 "${BENCH[@]}" "$DEIT_S" "${INFER[@]}" --batch-size 256 "${TIMING[@]}"
    run_part inference "DeiT-S batch 1" 150 "${BENCH[@]}" "$DEIT_S" "${INFER[@]}" --batch-size 1 "${TIMING[@]}"
    run_part whole "Mask R-CNN DynamicViT-B batch 1" 120 "${BENCH[@]}" "$MASK_RCNN_B" "${WHOLE[@]}" --batch-size 1 \
        "${TIMING[@]}"
    run_part whole "Segmenter DynamicViT-S batch 8" 120 "${BENCH[@]}" "$SEGMENTER_S" "${WHOLE[@]}" --batch-size 8 \
        "${TIMING[@]}"
    run_part training "train Mask R-CNN DynamicViT-S" 150 "${BENCH[@]}" "$MASK_RCNN_S" --train "${TRAIN[@]}" \
        "${TIMING[@]}"
    run_part inference "DeiT-B batch 256" 150 "${BENCH[@]}" "$DEIT_B" "${INFER[@]}" --batch-size 256 "${TIMING[@]}"
    run_part inference "DeiT-B batch 1" 150 "${BENCH[@]}" "$DEIT_B" "${INFER[@]}" --batch-size 1 "${TIMING[@]}"
    run_part inference "Swin-T batch 128" 150 "${BENCH[@]}" "$SWIN_T" "${INFER[@]}" --batch-size 128 "${TIMING[@]}"
    run_part inference "Swin-T batch 1" 150 "${BENCH[@]}" "$SWIN_T" "${INFER[@]}" --batch-size 1 "${TIMING[@]}"
    run_part inference "ConvNeXt-T batch 128" 150 "${BENCH[@]}" "$CONVNEXT_T" "${INFER[@]}" --batch-size 128 \
        "${TIMING[@]}"
    run_part inference "ConvNeXt-T batch 1" 150 "${BENCH[@]}" "$CONVNEXT_T" "${INFER[@]}" --batch-size 1 "${TIMING[@]}"
    run_part whole "Mask R-CNN DynamicViT-S batch 1" 120 "${BENCH[@]}" "$MASK_RCNN_S" "${WHOLE[@]}" --batch-size 1 \
        "${TIMING[@]}"
    run_part whole "Mask R-CNN DynamicViT-S batch 8" 120 "${BENCH[@]}" "$MASK_RCNN_S" "${WHOLE[@]}" --batch-size 8 \
        "${TIMING[@]}"
    run_part whole "Mask R-CNN DynamicViT-B batch 8" 120 "${BENCH[@]}" "$MASK_RCNN_B" "${WHOLE[@]}" --batch-size 8 \
        "${TIMING[@]}"
    run_part whole "Segmenter DynamicViT-S batch 1" 120 "${BENCH[@]}" "$SEGMENTER_S" "${WHOLE[@]}" --batch-size 1 \
        "${TIMING[@]}"
    run_part whole "Segmenter DynamicViT-B batch 1" 120 "${BENCH[@]}" "$SEGMENTER_B" "${WHOLE[@]}" --batch-size 1 \
        "${TIMING[@]}"
    run_part whole "Segmenter DynamicViT-B batch 8" 120 "${BENCH[@]}" "$SEGMENTER_B" "${WHOLE[@]}" --batch-size 8 \
        "${TIMING[@]}"
    run_part training "train Segmenter DynamicViT-S" 120 "${BENCH[@]}" "$SEGMENTER_S" --train "${TRAIN[@]}" \
        "${TIMING[@]}"
    run_part training "train Mask R-CNN DynamicViT-B" 150 "${BENCH[@]}" "$MASK_RCNN_B" --train "${TRAIN[@]}" \
        "${TIMING[@]}"
    run_part training "train Segmenter DynamicViT-B" 120 "${BENCH[@]}" "$SEGMENTER_B" --train "${TRAIN[@]}" \
        "${TIMING[@]}"
fi
write_report
echo "[report] done in $(( $(date +%s) - START )) s: $OUT/report.md"
if grep -q $'\tFAILED' "$ROWS"; then
    exit 1
fi
