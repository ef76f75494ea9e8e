#!/usr/bin/env bash
# One-shot GPU check of fmfast: install, the GPU tests with kernels compiled for real (bf16 and
# fp16 included), the benchmark suite, and a results table (markdown + JSON) in OUTDIR.
#
#   tools/gpu_check.sh OUTDIR
#
# Needs a CUDA machine with torch and triton already installed (e.g. torch 2.11 + triton 3.6);
# no network. Every stage runs under `timeout`, so the whole check ends within 8 minutes on one
# H200 even if a stage hangs; a stage that runs out of time is recorded as such and the check
# goes on. Logs of every stage, the pytest-benchmark JSON and results.md/results.json land in
# OUTDIR. Exit status: 0 if every stage passed, 1 otherwise.
#
# On this workplace's lent GPU machine (which returns at most 8 files from $OUT), run it as
#   tools/gpu_check.sh /tmp/gc; rc=$?; tar czf $OUT/gpu_check.tgz -C /tmp/gc .; cat /tmp/gc/results.md; exit $rc
set -uo pipefail

OUT=${1:?usage: tools/gpu_check.sh OUTDIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."

# the interpreter that holds torch: $PYTHON, else python3 (some CUDA images have no `python`)
PY=${PYTHON:-$(command -v python3 || command -v python)}
BUDGET=${GPU_CHECK_BUDGET:-470}  # seconds for everything (8 min = 480 s, a little to spare)
RESERVE=30                       # kept back for the results table (and a stage's 10 s kill grace)
START=$(date +%s)
export TRITON_INTERPRET=0        # compiled kernels; tests/conftest.py only sets 1 when unset
export PYTHONUNBUFFERED=1
export PYTHONDONTWRITEBYTECODE=1
: > "$OUT/stages.txt"

elapsed() { echo $(( $(date +%s) - START )); }
log() { echo "[gpu_check $(elapsed)s] $*" | tee -a "$OUT/gpu_check.log"; }

# stage NAME LIMIT CMD...: run CMD with at most LIMIT seconds (less if the budget is nearly
# spent), output to OUTDIR/NAME.log, status to OUTDIR/stages.txt (124 = ran out of time).
# The results stage is exempt: it runs in the reserve, so a table is written whatever ran out.
stage() {
    local name=$1 limit=$2 left
    shift 2
    left=$(( BUDGET - $(elapsed) - RESERVE ))
    [[ $name == results ]] && left=$limit
    (( limit > left )) && limit=$left
    if (( limit < 10 )); then
        log "stage $name skipped: budget spent"
        echo "$name skipped 0" >> "$OUT/stages.txt"
        return
    fi
    log "stage $name (limit ${limit}s): $*"
    local t0=$(date +%s)
    timeout --signal=INT --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    echo "$name $rc $(( $(date +%s) - t0 ))" >> "$OUT/stages.txt"
    log "stage $name: exit $rc after $(( $(date +%s) - t0 ))s"
    tail -n 3 "$OUT/$name.log" | sed 's/^/    /' | tee -a "$OUT/gpu_check.log"
}

{
    nvidia-smi || true
    "$PY" -c "import sys, torch, triton; print('python', sys.version.split()[0]); print('torch', torch.__version__, 'cuda', torch.version.cuda); print('triton', triton.__version__); print('device', torch.cuda.get_device_name() if torch.cuda.is_available() else 'NO CUDA')"
} > "$OUT/environment.txt" 2>&1
log "$(grep -E '^(torch|triton|device)' "$OUT/environment.txt" | tr '\n' ' ')"

stage install 90 "$PY" -m pip install --no-deps --no-build-isolation -e .

# The GPU tests (named *cuda*/*gpu*); the rest of tests/ runs the kernels in the interpreter on
# CPU tensors and is the CPU suite's job. "not interpreter": a test that puts GPU tile sizes
# through the interpreter on purpose.
stage gpu_tests 150 "$PY" -m pytest -q -p no:cacheprovider --continue-on-collection-errors -rs -k "(cuda or gpu) and not interpreter" \
    --junitxml="$OUT/gpu_tests.xml" tests/kernels tests/nn tests/engine/test_graphs.py tests/models/test_swap.py \
    tests/data/test_dataset.py tests/engine/test_metrics.py

# The end-to-end targets first (training step, then inference: separate stages, so the training
# bench's cold torch.compile peers cannot eat the inference bench's time), then the rest of the
# suite (kernels, data, ingest) with what is left; -s keeps the printed tables in the logs.
stage bench_train 130 "$PY" -m pytest -q -p no:cacheprovider --continue-on-collection-errors -s -rs --benchmark-only \
    --benchmark-json="$OUT/bench_train.json" bench/test_bench_train.py
stage bench_model 110 "$PY" -m pytest -q -p no:cacheprovider --continue-on-collection-errors -s -rs --benchmark-only \
    --benchmark-json="$OUT/bench_model.json" bench/test_bench_model.py
stage bench_rest 240 "$PY" -m pytest -q -p no:cacheprovider --continue-on-collection-errors -s -rs --benchmark-only \
    --benchmark-json="$OUT/bench_rest.json" --ignore=bench/test_bench_train.py --ignore=bench/test_bench_model.py bench

# The cost model's predictions for the same cases (compiles for sm_90, runs nothing on the GPU),
# printed beside the measurements in results.md; if the budget is spent the committed
# bench/cost_model.json stands in.
stage cost_model 90 "$PY" tools/kernel_report.py --dtypes bfloat16 --json "$OUT/kernel_report.json" \
    --components "$OUT/cost_model.json" --markdown "$OUT/kernel_report.md"

stage results 20 "$PY" tools/gpu_results.py "$OUT"
log "done in $(elapsed)s; table: $OUT/results.md"
awk '$2 != 0 { bad = 1 } END { exit bad }' "$OUT/stages.txt"
