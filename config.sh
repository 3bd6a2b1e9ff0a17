#!/usr/bin/env bash
# One rank's settings and environment, as in the original Partial FC: every launcher starts this script
# once per rank (`horovodrun -np 16 -H ip1:8,ip2:8 bash config.sh`, `bash run.sh` with mpirun, or
# `torchrun --nproc-per-node 8 --no-python ... bash config.sh`). Extra arguments go to `partial-fc train`.
set -euo pipefail
cd "$(dirname "$0")"

# Threads and communication.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
export HOROVOD_CYCLE_TIME="${HOROVOD_CYCLE_TIME:-0.1}"
export HOROVOD_FUSION_THRESHOLD="${HOROVOD_FUSION_THRESHOLD:-67108864}"
export HOROVOD_CACHE_CAPACITY="${HOROVOD_CACHE_CAPACITY:-0}"
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
export PARTIAL_FC_COMM="${PARTIAL_FC_COMM:-auto}"   # auto, horovod, torch or single

# The network interface every host's ranks talk over (for example NET_IF=ib0 or NET_IF=eth0): one setting for
# Gloo, NCCL and Horovod's Gloo, so none of them picks a wrong one (docker0, virbr0). run.sh passes it to MPI.
if [ -n "${NET_IF:-}" ]; then
    export GLOO_SOCKET_IFNAME="$NET_IF" NCCL_SOCKET_IFNAME="$NET_IF" HOROVOD_GLOO_IFACE="$NET_IF"
fi

# A restart by torchrun's --max-restarts (or by run.sh's MAX_RESTARTS) continues from the newest checkpoint.
if [ "${TORCHELASTIC_RESTART_COUNT:-0}" -gt 0 ] && [ -z "${RESUME:-}" ]; then
    RESUME=auto
fi

# The run: a config file (or a name in partial_fc/configs/), and the settings most often changed per run. A setting
# given here overrides the file; any other config key can be set as PFC_<KEY>=value or --set key=value.
CONFIG="${CONFIG:-synthetic}"
SETTINGS=(NETWORK REC OUTPUT NUM_CLASSES NUM_IMAGE NUM_EPOCH BATCH_SIZE LR SAMPLE_RATE EMBEDDING_SIZE FP16
          GRADIENT_ACC NUM_WORKERS RESUME)
for name in "${SETTINGS[@]}"; do
    if [ -n "${!name:-}" ]; then export "PFC_${name}=${!name}"; fi
done

exec "${PYTHON:-python3}" -m partial_fc train "$CONFIG" "$@"
