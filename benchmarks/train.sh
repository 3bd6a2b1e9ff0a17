#!/usr/bin/env bash
# Training throughput (perf mode) for r18, r50 and MobileFaceNet at batch 64 per rank, 2 ranks x 1 thread,
# on the generated face set (RecordIO, decoded by 1 loader worker per rank). Each network prints one JSON
# line: samples/s over both ranks and each phase's share of the time. Override with NETWORKS, NP, BATCH,
# STEPS, REC. On a GPU machine: NP=1 NETWORKS=r50 EXTRA="--set fp16=true --set amp_dtype=bfloat16".
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
REC="${REC:-data/synthetic}"
if [ ! -f "$REC/train.rec" ]; then
    python3 -m partial_fc make-synthetic --identities 400 --images-per-id 20 --out "$REC" >/dev/null
fi
for network in ${NETWORKS:-r18 mbf r50}; do
    mpirun -np "${NP:-2}" --oversubscribe --bind-to none \
        python3 -m partial_fc train synthetic --set rec="$REC" --set network="$network" --set embedding_size=512 \
        --set batch_size="${BATCH:-64}" --set num_workers=1 --set output="/tmp/partial_fc_bench_$network" \
        --set val_targets=[] --perf-steps "${STEPS:-3}" ${EXTRA:-} 2>&1 \
        | sed 's/^\[[0-9,]*\]<stdout>://' | grep '^{"job": "train"' | head -n 1 \
        | python3 -c 'import json, sys; r = json.loads(sys.stdin.read()); print(json.dumps({"bench": "train", "network": r["network"], "ranks": r["ranks"], "samples_per_second": round(r["samples_per_second"], 2), "phases": {k: round(v, 3) for k, v in r["phases"].items()}, **{k: r[k] for k in ("load_average_start", "load_average_end", "load_average_max", "cores", "threads_per_rank", "compute_thread_wait_share", "steal_share", "warnings") if k in r}}))'
done
