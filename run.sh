#!/usr/bin/env bash
# The main job: start config.sh on every rank with mpirun (as the original Partial FC did), then evaluate
# the trained backbone on the config's verification sets, export it to ONNX, and print a summary.
#   bash run.sh                                   the synthetic default: data/synthetic is made if missing,
#                                                 2 ranks on this machine
#   NP=16 HOSTFILE=hosts/host_8 CONFIG=ms1mv3_r50 bash run.sh   an OpenMPI hostfile (`localhost slots=8`)
#   NP=16 HOSTS=ip1:8,ip2:8 CONFIG=ms1mv3_r50 bash run.sh       a host list
#   NETWORK=r18 NUM_EPOCH=2 bash run.sh           settings (see config.sh); arguments go to `partial-fc train`
#   NET_IF=eth0 HOSTS=... bash run.sh              the interface for MPI, Gloo and NCCL on every host
#   MAX_RESTARTS=3 bash run.sh                    start a failed job again (up to 3 times) from its newest
#                                                 checkpoint, without the hosts that stopped answering
#   LAUNCHER=horovodrun (or torchrun) bash run.sh  another launcher (torchrun: this machine only)
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

# Host list as host:slots entries, from HOSTS (ip1:8,ip2:8) or an OpenMPI hostfile (`host slots=8`).
hosts=()
if [ -n "${HOSTFILE:-}" ]; then
    while read -r host rest; do
        case "$host" in ''|'#'*) continue ;; esac
        slots="$(sed -n 's/.*slots=\([0-9]*\).*/\1/p' <<<"$rest")"
        hosts+=("$host:${slots:-1}")
    done <"$HOSTFILE"
elif [ -n "${HOSTS:-}" ]; then
    IFS=, read -r -a hosts <<<"$HOSTS"
fi
for i in "${!hosts[@]}"; do
    case "${hosts[$i]}" in *:*) ;; *) hosts[$i]="${hosts[$i]}:1" ;; esac
done

forward=(PATH LD_LIBRARY_PATH PYTHONPATH OMP_NUM_THREADS PARTIAL_FC_COMM CONFIG NCCL_DEBUG NCCL_SOCKET_IFNAME
         GLOO_SOCKET_IFNAME NET_IF NETWORK REC OUTPUT NUM_CLASSES NUM_IMAGE NUM_EPOCH BATCH_SIZE LR SAMPLE_RATE
         EMBEDDING_SIZE FP16 GRADIENT_ACC NUM_WORKERS RESUME PARTIAL_FC_JOB_ID PARTIAL_FC_ATTEMPT)

# Options every mpirun here takes (the job's and the host probes').
mpi_options=(--bind-to none)
if [ "$(id -u)" -eq 0 ]; then mpi_options+=(--allow-run-as-root); fi
if [ -n "${NET_IF:-}" ]; then mpi_options+=(--mca btl_tcp_if_include "$NET_IF" --mca oob_tcp_if_include "$NET_IF"); fi

# The launch command for NP ranks on the hosts in `hosts` (none: this machine).
launch_command() {
    local host_list name
    host_list="$(IFS=,; echo "${hosts[*]}")"
    case "${LAUNCHER:-mpirun}" in
    mpirun)
        launch=(mpirun "${mpi_options[@]}" -np "$NP" --map-by slot)
        if [ -n "$host_list" ]; then launch+=(-H "$host_list"); fi
        if [ "$NP" -gt "$(nproc)" ] || [ -z "$host_list" ]; then launch+=(--oversubscribe); fi
        for name in "${forward[@]}" $(compgen -e | grep '^PFC_' || true); do
            if [ -n "${!name:-}" ]; then launch+=(-x "$name"); fi
        done ;;
    horovodrun)
        launch=(horovodrun -np "$NP" -H "${host_list:-localhost:$NP}")
        if [ -n "${NET_IF:-}" ]; then launch+=(--network-interface "$NET_IF"); fi ;;
    torchrun)   # this machine only; on several, start torchrun on each node (README, multi-node)
        launch=("$PYTHON" -m torch.distributed.run --standalone --nproc-per-node "$NP"
                --max-restarts "${MAX_RESTARTS:-0}" --no-python) ;;
    *) echo "run.sh: LAUNCHER=$LAUNCHER is not mpirun, horovodrun or torchrun" >&2; exit 2 ;;
    esac
}

# Keep the hosts that still answer, and no more ranks than they hold.
drop_lost_hosts() {
    local alive=() entry host slots=0
    for entry in "${hosts[@]}"; do
        host="${entry%%:*}"
        if [ "${LAUNCHER:-mpirun}" = horovodrun ]; then
            probe=(ssh -o BatchMode=yes -o ConnectTimeout=10 "$host" true)
        else
            probe=(mpirun "${mpi_options[@]}" -np 1 -H "$host:1" true)
        fi
        if timeout 30 "${probe[@]}" >/dev/null 2>&1; then
            alive+=("$entry"); slots=$(( slots + ${entry##*:} ))
        else
            echo "run.sh: host $host does not answer; going on without it" >&2
        fi
    done
    if [ ${#alive[@]} -eq 0 ]; then echo "run.sh: no host answers; giving up" >&2; exit 1; fi
    hosts=("${alive[@]}")
    if [ "$slots" -lt "$NP" ]; then NP="$slots"; fi
}

summary="$(mktemp -t partial_fc_summary.XXXXXX.json)"
trap 'rm -f "$summary"' EXIT
stopped=""
forward_stop() { stopped=1; if [ -n "${job:-}" ]; then kill -TERM "$job" 2>/dev/null || true; fi; }
trap forward_stop TERM INT

# Train; with MAX_RESTARTS=N, a failed job (not a bad input, exit 2, nor a stop, exit 75) is started again
# up to N times, on the hosts that still answer, from the newest valid checkpoint. torchrun restarts itself.
restarts=0
export PARTIAL_FC_JOB_ID="${PARTIAL_FC_JOB_ID:-run.sh-${HOSTNAME:-host}-$$-$(date +%s)}"
while :; do
    export PARTIAL_FC_ATTEMPT="$restarts"   # a restart takes over its earlier attempt's lock on output
    launch_command
    "${launch[@]}" bash config.sh --summary "$summary" "$@" &
    job=$!
    status=0
    wait "$job" || status=$?
    while kill -0 "$job" 2>/dev/null; do wait "$job" || status=$?; done   # a signal only interrupted the wait
    job=""
    if [ "$status" -eq 0 ]; then break; fi
    if [ -n "$stopped" ]; then exit 75; fi   # stopped on request, with a checkpoint: resume with RESUME=1
    if [ "$status" -eq 2 ] || [ "$status" -eq 75 ] || [ "${LAUNCHER:-mpirun}" = torchrun ] \
        || [ "$restarts" -ge "${MAX_RESTARTS:-0}" ]; then
        exit "$status"
    fi
    restarts=$(( restarts + 1 ))
    if [ ${#hosts[@]} -gt 0 ]; then drop_lost_hosts; fi
    echo "run.sh: the job failed (exit $status); restart $restarts of $MAX_RESTARTS on $NP ranks," \
         "from the newest checkpoint" >&2
    export RESUME=auto
done

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
