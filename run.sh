#!/usr/bin/env bash
# Start config.sh on every rank with mpirun, as the original Partial FC did.
#   bash run.sh                 2 ranks on this machine
#   NP=16 HOSTFILE=hosts/host_8 bash run.sh     an OpenMPI hostfile (lines like `localhost slots=8`)
#   NP=16 HOSTS=ip1:8,ip2:8 bash run.sh         a host list
# Arguments after the options go to the trainer (bash run.sh --steps 50).
set -euo pipefail
cd "$(dirname "$0")"

NP="${NP:-2}"
launch=(mpirun -np "$NP" --bind-to none --map-by slot)
if [ -n "${HOSTFILE:-}" ]; then
    launch+=(--hostfile "$HOSTFILE")
elif [ -n "${HOSTS:-}" ]; then
    launch+=(-H "$HOSTS")
fi
if [ "$NP" -gt "$(nproc)" ] || [ -z "${HOSTFILE:-}${HOSTS:-}" ]; then
    launch+=(--oversubscribe)
fi
if [ "$(id -u)" -eq 0 ]; then
    launch+=(--allow-run-as-root)
fi
for name in PATH LD_LIBRARY_PATH PYTHONPATH OMP_NUM_THREADS PARTIAL_FC_COMM CLASSES EMBEDDING_SIZE BATCH_SIZE \
            SAMPLE_RATE MARGIN SCALE LR STEPS NCCL_DEBUG NCCL_SOCKET_IFNAME; do
    if [ -n "${!name:-}" ]; then launch+=(-x "$name"); fi
done
exec "${launch[@]}" bash config.sh "$@"
