#!/usr/bin/env bash
# The head benchmark's table in benchmarks/README.md: 1M classes, D=512, 128 per rank, rate 0.1, 2 ranks x 1 thread.
# Each configuration prints one JSON line. Override the size with CLASSES, DIM, BATCH, RATE, STEPS, NP.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1 OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
size=(--classes "${CLASSES:-1000000}" --dim "${DIM:-512}" --batch "${BATCH:-128}" --sample-rate "${RATE:-0.1}" --steps "${STEPS:-8}")
run() { mpirun -np "${NP:-2}" --oversubscribe "$@" 2>&1 | grep '"bench": "head"' | sed 's/^\[[0-9,]*\]<stdout>://'; }
run python3 -m partial_fc bench head "${size[@]}"
run -x PARTIAL_FC_COMM=torch python3 -m partial_fc bench head "${size[@]}"
run python3 -m partial_fc bench head "${size[@]}" --storage-dtype bfloat16
run python3 -m partial_fc bench head "${size[@]}" --update-in-step
