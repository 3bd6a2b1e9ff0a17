#!/usr/bin/env bash
# The head benchmarks of benchmarks/README.md: one JSON line per configuration, then a markdown table of them.
#
#   bash benchmarks/head.sh [table|backends|all]
#
# table (the default), as the Partial FC paper's table: sample rate 1.0 (the full softmax, i.e. model
#   parallel) against 0.1 (Partial FC) at CLASSES (1,000,000) and BIG_CLASSES (10,000,000) classes, with
#   step time and peak memory per rank. Before allocating anything each run estimates its memory per rank
#   (shard + optimizer state + logits + workspaces, partial_fc.perf.memory) and, when that exceeds the
#   memory available per rank, is not run: its row says "does not fit: needs ~X GiB per rank, Y GiB
#   available". The BIG_CLASSES rows take their extra options from BIG_OPTS (default: --storage-dtype
#   bfloat16; e.g. BIG_OPTS="--storage-dtype bfloat16 --momentum-dtype int8"), the others from OPTS.
# backends: the four 1M rows of the backend table (Horovod, torch.distributed, bfloat16 storage, the update
#   kept for step()).
#
# D=512, 128 per rank, 2 ranks x 1 thread unless DIM, BATCH, NP (and OMP_NUM_THREADS) say otherwise; STEPS
# timed steps; RATES ("1.0 0.1") the sample rates of the table. PARTIAL_FC_AVAILABLE_GIB pretends the memory
# available per rank (GiB); JSON_OUT=FILE keeps the JSON lines there.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
mode="${1:-table}"
case "$mode" in table|backends|all) ;; *) echo "usage: bash benchmarks/head.sh [table|backends|all]" >&2; exit 2 ;; esac
lines="${JSON_OUT:-$(mktemp /tmp/partial_fc_head.XXXXXX.jsonl)}"
: > "$lines"
common=(--dim "${DIM:-512}" --batch "${BATCH:-128}" --steps "${STEPS:-8}")

# run "MPIRUN_OPTIONS" BENCH_OPTIONS...: one configuration's JSON line (a "failed" line if it printed none).
run() {
    local launcher=$1 out line status=0
    shift
    # shellcheck disable=SC2086  # the launcher options are words
    out=$(mpirun -np "${NP:-2}" --oversubscribe $launcher python3 -m partial_fc bench head "$@" 2>&1) || status=$?
    printf '%s\n' "$out" | grep 'warning:' >&2 || true
    # the JSON object alone: a rank's stderr warning can land on the same line, after the closing brace
    line=$(printf '%s\n' "$out" | grep '"bench": "head"' | sed 's/^\[[0-9,]*\]<stdout>://; s/^\(.*}\).*$/\1/' \
        | tail -n 1 || true)
    if [ -z "$line" ]; then
        printf '%s\n' "$out" | tail -n 20 >&2
        line=$(python3 -c 'import json, sys; print(json.dumps({"bench": "head", "failed": f"exit status {sys.argv[1]}", "command": sys.argv[2:]}))' "$status" "$@")
    fi
    printf '%s\n' "$line" | tee -a "$lines"
}

if [ "$mode" != backends ]; then
    read -r -a opts <<< "${OPTS:-}"
    read -r -a big_opts <<< "${BIG_OPTS---storage-dtype bfloat16}"
    for rate in ${RATES:-1.0 0.1}; do
        run "" --classes "${CLASSES:-1000000}" --sample-rate "$rate" "${common[@]}" ${opts[@]+"${opts[@]}"}
    done
    for rate in ${RATES:-1.0 0.1}; do
        run "" --classes "${BIG_CLASSES:-10000000}" --sample-rate "$rate" "${common[@]}" ${big_opts[@]+"${big_opts[@]}"}
    done
fi
if [ "$mode" != table ]; then
    size=(--classes "${CLASSES:-1000000}" --sample-rate "${RATE:-0.1}" "${common[@]}")
    run "" "${size[@]}"
    run "-x PARTIAL_FC_COMM=torch" "${size[@]}"
    run "" "${size[@]}" --storage-dtype bfloat16
    run "" "${size[@]}" --update-in-step
fi
echo
python3 -m partial_fc.perf.tables head "$lines"
