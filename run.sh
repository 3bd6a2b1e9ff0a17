#!/usr/bin/env bash
# The main job: start config.sh on every rank with mpirun (as the original Partial FC did), then evaluate
# the trained backbone on the config's verification sets, export it to ONNX, and print a summary.
#   bash run.sh                                   the synthetic default: data/synthetic is made if missing,
#                                                 2 ranks on this machine
#   NP=16 HOSTFILE=hosts/host_8 CONFIG=ms1mv3_r50 bash run.sh   an OpenMPI hostfile (`localhost slots=8`)
#   NP=16 HOSTS=ip1:8,ip2:8 CONFIG=ms1mv3_r50 bash run.sh       a host list
#   NETWORK=r18 NUM_EPOCH=2 bash run.sh           settings (see config.sh); arguments go to `partial-fc train`
set -euo pipefail
cd "$(dirname "$0")"
PYTHON="${PYTHON:-python3}"
export CONFIG="${CONFIG:-synthetic}"
NP="${NP:-2}"
started=$SECONDS

if [ "$CONFIG" = synthetic ] && [ -z "${REC:-}${PFC_REC:-}" ] && [ ! -f data/synthetic/train.rec ]; then
    "$PYTHON" -m partial_fc make-synthetic --identities "${SYNTHETIC_IDENTITIES:-400}" \
        --images-per-id "${SYNTHETIC_IMAGES_PER_ID:-20}" --out data/synthetic
fi

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
forward=(PATH LD_LIBRARY_PATH PYTHONPATH OMP_NUM_THREADS PARTIAL_FC_COMM CONFIG NCCL_DEBUG NCCL_SOCKET_IFNAME
         NETWORK REC OUTPUT NUM_CLASSES NUM_IMAGE NUM_EPOCH BATCH_SIZE LR SAMPLE_RATE EMBEDDING_SIZE FP16
         GRADIENT_ACC NUM_WORKERS RESUME)
forward+=($(compgen -e | grep '^PFC_' || true))
for name in "${forward[@]}"; do
    if [ -n "${!name:-}" ]; then launch+=(-x "$name"); fi
done

summary="$(mktemp -t partial_fc_summary.XXXXXX.json)"
trap 'rm -f "$summary"' EXIT
"${launch[@]}" bash config.sh --summary "$summary" "$@"

# Evaluate and export the final checkpoint, on this machine (rank 0's view of the shared output folder).
field() { "$PYTHON" -c 'import json, sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])' "$summary" "$1"; }
checkpoint="$(field checkpoint)"
network="$(field network)"
embedding_size="$(field embedding_size)"
output="$(field output)"
if [ "$(field perf_steps)" != 0 ]; then exit 0; fi
bins=()
for path in $("$PYTHON" -c 'import json, sys; print(" ".join(json.load(open(sys.argv[1]))["val_sets"]))' "$summary"); do
    bins+=(--bin "$path")
done
if [ ${#bins[@]} -gt 0 ]; then
    "$PYTHON" -m partial_fc eval --weights "$checkpoint" --network "$network" --embedding-size "$embedding_size" \
        "${bins[@]}" --roc-dir "$output"
fi
"$PYTHON" -m partial_fc export --weights "$checkpoint" --network "$network" --embedding-size "$embedding_size" \
    --output "$output/model.onnx"
echo "run.sh: trained $network for $(field steps) steps on $NP ranks in $(( SECONDS - started )) s;" \
     "best verification $(field best_verification); checkpoint $checkpoint; ONNX $output/model.onnx"
