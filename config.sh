#!/usr/bin/env bash
# One rank's settings and environment, as in the original Partial FC: every launcher starts this script
# once per rank (`horovodrun -np 16 -H ip1:8,ip2:8 bash config.sh`, or `bash run.sh`, which uses mpirun).
# Override any setting from the environment (CLASSES=100000 bash run.sh); extra arguments pass through.
set -euo pipefail
cd "$(dirname "$0")"

# Threads and communication.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
export HOROVOD_CYCLE_TIME="${HOROVOD_CYCLE_TIME:-0.1}"
export HOROVOD_FUSION_THRESHOLD="${HOROVOD_FUSION_THRESHOLD:-67108864}"
export HOROVOD_CACHE_CAPACITY="${HOROVOD_CACHE_CAPACITY:-0}"
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
export PARTIAL_FC_COMM="${PARTIAL_FC_COMM:-auto}"   # auto, horovod, torch or single

# The run. Until the training application lands, the main job is the Partial FC demo: a small network
# and the sharded head trained on generated identities, its loss printed as it falls.
CLASSES="${CLASSES:-2000}"
EMBEDDING_SIZE="${EMBEDDING_SIZE:-64}"
BATCH_SIZE="${BATCH_SIZE:-128}"        # per rank
SAMPLE_RATE="${SAMPLE_RATE:-0.2}"
MARGIN="${MARGIN:-cosface}"            # arcface, cosface, or m1,m2,m3
SCALE="${SCALE:-32}"
LR="${LR:-0.1}"
STEPS="${STEPS:-150}"

exec "${PYTHON:-python3}" -m partial_fc demo \
    --classes "$CLASSES" --dim "$EMBEDDING_SIZE" --batch "$BATCH_SIZE" --sample-rate "$SAMPLE_RATE" \
    --margin "$MARGIN" --scale "$SCALE" --lr "$LR" --steps "$STEPS" "$@"
