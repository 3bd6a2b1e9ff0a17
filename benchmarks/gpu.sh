#!/usr/bin/env bash
# The checks for a machine with one GPU, in one script of under 8 minutes:
#   1. the CUDA paths' tests (tests/test_cuda.py: the head against float64 on the GPU, fp16 matmuls, training
#      with fp16 autocast and the GradScaler, bfloat16 storage and autocast);
#   2. `partial-fc bench head` at CLASSES (1M) and BIG_CLASSES (10M, with BIG_OPTS, default --storage-dtype
#      bfloat16) classes, sample rates 1.0 and 0.1: step time against its matmul floor, peak allocated memory;
#   3. the GPU's fp16 and bf16 matmul rate (an 8192^3 GEMM), then r50 training in perf mode on in-memory
#      synthetic batches (fp16 autocast, channels-last): images/s and its FLOP rate (3 x 12.6 GFLOP per
#      112x112 image) as a percentage of the matmul rate; the target is 30%.
# Everything goes to one folder ($OUT if set, else a new temporary one) as JSON, logs, summary.json and summary.md.
#
#   bash benchmarks/gpu.sh              # on the GPU machine
#   bash benchmarks/gpu.sh --dry-run    # (or DRY_RUN=1) the whole script on the CPU at tiny sizes, in seconds
#
# Sizes: CLASSES, BIG_CLASSES, RATES, HEAD_DIM, HEAD_BATCH, HEAD_STEPS, HEAD_OPTS (every head run, e.g. --fp16),
# BIG_OPTS (the BIG_CLASSES runs), MATMUL_SIZE, MATMUL_DTYPES, NETWORK, EMBEDDING,
# TRAIN_BATCH, TRAIN_STEPS, TRAIN_AMP (e.g. "float16 bfloat16"), TRAIN_WORKERS; CUDA_TESTS (test files) and
# TESTS_SELECT (a pytest -k expression; the dry run picks a few tests);
# TIME_BUDGET (seconds for the whole script: each step's timeout is cut to what is left).
set -uo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--dry-run" ]; then DRY_RUN=1; shift; fi
DRY_RUN="${DRY_RUN:-0}"
out="${OUT:-$(mktemp -d /tmp/partial_fc_gpu.XXXXXX)}"
mkdir -p "$out"
: > "$out/steps.jsonl"

if [ "$DRY_RUN" = 1 ]; then
    export PARTIAL_FC_TEST_DEVICE=cpu  # the CUDA tests run on the CPU (a few of them: CPU float16 is slow)
    : "${TESTS_SELECT:=head_on_the_device and arcface}"
    budget="${TIME_BUDGET:-55}"
    : "${CLASSES:=2000}" "${BIG_CLASSES:=20000}" "${HEAD_DIM:=32}" "${HEAD_BATCH:=16}" "${HEAD_STEPS:=2}"
    : "${MATMUL_SIZE:=128}" "${NETWORK:=r10_nano}" "${EMBEDDING:=128}" "${TRAIN_BATCH:=8}" "${TRAIN_STEPS:=1}"
    : "${TRAIN_AMP:=bfloat16}" "${TRAIN_WORKERS:=0}" "${MATMUL_DTYPES:=float32 bfloat16}"
    caps=(40 20 20 30 5)  # seconds: tests, head (each run), matmul, train (each run), kept for the summary
else
    if ! python3 -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
        echo "gpu.sh: no CUDA device here; run it on the GPU machine, or with --dry-run" >&2
        exit 2
    fi
    budget="${TIME_BUDGET:-470}"
    : "${CLASSES:=1000000}" "${BIG_CLASSES:=10000000}" "${HEAD_DIM:=512}" "${HEAD_BATCH:=512}" "${HEAD_STEPS:=20}"
    : "${MATMUL_SIZE:=8192}" "${NETWORK:=r50}" "${EMBEDDING:=512}" "${TRAIN_BATCH:=512}" "${TRAIN_STEPS:=30}"
    : "${TRAIN_AMP:=float16}" "${TRAIN_WORKERS:=4}" "${MATMUL_DTYPES:=float16 bfloat16}"
    caps=(150 90 40 150 15)
fi
RATES="${RATES:-1.0 0.1}"
CUDA_TESTS="${CUDA_TESTS:-tests/test_cuda.py}"
read -r -a big_opts <<< "${BIG_OPTS---storage-dtype bfloat16}"
read -r -a head_opts <<< "${HEAD_OPTS:-}"
failures=0

# step NAME CAP STDOUT STDERR COMMAND...: run COMMAND under a timeout (CAP, or the time left), record it in steps.jsonl
step() {
    local name=$1 cap=$2 stdout=$3 stderr=$4 status=0 note="" start=$SECONDS left
    shift 4
    left=$(( budget - SECONDS - caps[4] ))
    if (( left < 3 )); then
        status=124 note="skipped: out of time"
    else
        (( cap > left )) && cap=$left
        timeout --kill-after=10 "$cap" "$@" > "$stdout" 2> "$stderr" || status=$?
        if (( status == 124 || status == 137 )); then note="timed out after ${cap} s"; fi
    fi
    (( status == 0 )) || failures=$((failures + 1))
    printf '{"step": "%s", "status": %d, "seconds": %d, "note": "%s"}\n' "$name" "$status" $((SECONDS - start)) \
        "$note" >> "$out/steps.jsonl"
    echo "gpu.sh: $name: $([ "$status" = 0 ] && echo ok || echo "failed (${note:-exit $status})") in $((SECONDS - start)) s" >&2
}

# shellcheck disable=SC2086  # CUDA_TESTS is a list of files
step tests "${caps[0]}" "$out/tests.txt" "$out/tests.err" \
    python3 -m pytest -q -rs -p no:cacheprovider --junitxml="$out/tests.xml" ${TESTS_SELECT:+-k "$TESTS_SELECT"} $CUDA_TESTS

for classes in "$CLASSES" "$BIG_CLASSES"; do
    opts=(${head_opts[@]+"${head_opts[@]}"})
    [ "$classes" = "$BIG_CLASSES" ] && opts+=(${big_opts[@]+"${big_opts[@]}"})
    for rate in $RATES; do
        step "head ${classes} r=${rate}" "${caps[1]}" "$out/head_${classes}_${rate}.json" "$out/head_${classes}_${rate}.log" \
            python3 -m partial_fc bench head --classes "$classes" --sample-rate "$rate" --dim "$HEAD_DIM" \
            --batch "$HEAD_BATCH" --steps "$HEAD_STEPS" ${opts[@]+"${opts[@]}"}
    done
done

# shellcheck disable=SC2086  # MATMUL_DTYPES is a list
step matmul "${caps[2]}" "$out/matmul.json" "$out/matmul.log" \
    python3 -m partial_fc.perf.gpu matmul --size "$MATMUL_SIZE" --dtypes $MATMUL_DTYPES

for amp in $TRAIN_AMP; do
    step "train ${NETWORK} ${amp}" "${caps[3]}" "$out/train_${NETWORK}_${amp}.log" "$out/train_${NETWORK}_${amp}.err" \
        python3 -m partial_fc.perf.gpu train --network "$NETWORK" --embedding-size "$EMBEDDING" --batch "$TRAIN_BATCH" \
        --steps "$TRAIN_STEPS" --amp "$amp" --channels-last --workers "$TRAIN_WORKERS" --matmul "$out/matmul.json" \
        --matmul-size "$MATMUL_SIZE" --json "$out/train_${NETWORK}_${amp}.json"
done

python3 -m partial_fc.perf.gpu summary "$out" || failures=$((failures + 1))
echo "gpu.sh: results in $out ($SECONDS s)" >&2
[ "$failures" = 0 ]
