#!/usr/bin/env bash
# The GPU check on a lent GPU machine, from the kit that `make gpu-kit` built (docs/benchmarks.md#the-gpu-check).
#
#   bash .gpu-kit/run.sh [--device cuda|cpu] [--python PYTHON] [--total SECONDS]
#
# Installs the kit's wheels beside the image's packages (--no-deps --target: nothing of the image is
# replaced), runs `saepipe gpu-check` on the kit's SmolLM2 shape with each step's time budget, and leaves
# in $OUT (./runs/gpu-kit when unset): gpu.json, gpu-check.log, profile.txt and packages.txt.
# `--device cpu` is the dry run at toy sizes (`make gpu-kit-proof` runs it in a copy of the image).
set -uo pipefail

KIT="$(cd "$(dirname "$0")" && pwd)"
REPO="$(cd "$KIT/.." && pwd)"
DEVICE=cuda
PYTHON=python3
TOTAL=480 # the whole check, install included, must end inside a lease's first call
while [ $# -gt 0 ]; do
    case "$1" in
        --device) DEVICE="$2"; shift 2 ;;
        --python) PYTHON="$2"; shift 2 ;;
        --total) TOTAL="$2"; shift 2 ;;
        *) echo "run.sh: unknown argument $1 (known: --device, --python, --total)" >&2; exit 2 ;;
    esac
done
OUT="${OUT:-$REPO/runs/gpu-kit}"
mkdir -p "$OUT"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/saepipe-gpu-kit.XXXXXX")"
started=$SECONDS

echo "gpu-kit: installing $(ls "$KIT"/wheels/*.whl | wc -l) wheels into $WORK/site" | tee "$OUT/gpu-check.log"
"$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --disable-pip-version-check \
    --target "$WORK/site" "$KIT"/wheels/*.whl 2>&1 | tee -a "$OUT/gpu-check.log" || exit 1
export PYTHONPATH="$WORK/site:$REPO" PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
export SAEPIPE_CACHE="$WORK/cache" HF_HUB_OFFLINE=1 WANDB_MODE=disabled
"$PYTHON" -m pip list --format freeze --disable-pip-version-check >"$OUT/packages.txt" 2>/dev/null
echo "gpu-kit: installed in $((SECONDS - started)) s" | tee -a "$OUT/gpu-check.log"

# Each step stops itself at its budget (gpu-check's STEP_BUDGETS); this outer limit catches a hang in
# native code, which no budget can interrupt. gpu.json is rewritten after every step, so a cut keeps the rest.
left=$((TOTAL - (SECONDS - started)))
cd "$REPO"
timeout --signal=INT --kill-after=15 "$left" "$PYTHON" -m benchmarks \
    gpu-check --device "$DEVICE" --model-shape "$KIT/smollm2-shape" --out "$WORK/gpu" 2>&1 | tee -a "$OUT/gpu-check.log"
status=${PIPESTATUS[0]}
cp "$WORK/gpu/gpu.json" "$WORK/gpu/profile.txt" "$OUT/" 2>/dev/null
echo "gpu-kit: exit $status after $((SECONDS - started)) s; results in $OUT" | tee -a "$OUT/gpu-check.log"
rm -rf "$WORK"
exit "$status"
