# The launcher shared by the RDI-Net SLURM templates: slurm/<template>.sh sets its variables and
# sources this file. It runs a job's stages (warmup, then joint) as separate SLURM jobs, the joint
# job chained with --dependency=afterok on the warm-up job, and skips stages already complete.
#
#   sbatch slurm/<template>.sh [sbatch options]
#       The job checks the run (job file, data root on every node, run directory), submits the
#       stages after its own as jobs chained on it, and runs the first pending stage.
#   bash slurm/<template>.sh [sbatch options]
#       The same checks now, on this machine, before any queue wait; then submits every pending
#       stage as its own job, chained. Prints the job ids.
#   Either way, when every stage is complete it says so and submits or runs nothing.
#
# Inside a stage job: one `srun` task per node starts `accelerate launch` through
# `python -m pipeline.launch` (DeepSpeed, static rendezvous, machine rank = SLURM_NODEID, main
# process on the first node). On SIGUSR1 (sent by #SBATCH --signal=B:USR1@180 before the time
# limit) or SIGTERM (preemption), the batch shell asks every training process to checkpoint
# (SIGTERM to the job steps), waits for them, and requeues the job, which then resumes from that
# checkpoint. A run that stopped for requeue by itself (train.stop_at_step) is requeued too: it
# leaves <run dir>/stopped-for-requeue.json. Logs: <run dir>/logs/<stage>-<jobid>.log.
#
# Variables (set by the template, overridable from the environment):
#   JOB, RUN_DIR, DATA_ROOT (empty: the job's data.root), EXTRA_ARGS (--set key=value ...; no spaces
#   inside a value), VENV (default .venv), LAUNCH_CONFIG (default jobs/accelerate/multi_node.yaml),
#   GPUS_PER_NODE (default: what SLURM allocated per node; 0 = CPU nodes, one process each),
#   MASTER_PORT (default from the job id), STOP_GRACE (s a training process gets to checkpoint
#   after the stop signal, default 150), NODE_EXIT_WAIT (s srun waits for the other nodes once one
#   node's task has ended, default 120), NCCL_* / GLOO_SOCKET_IFNAME (passed through; set them for
#   your network, e.g. NCCL_SOCKET_IFNAME=ib0).
# Paths are relative to the repository root, the jobs' working directory.

set -uo pipefail

die() {  # die CODE MESSAGE...
    local code=$1; shift
    echo "error: $*" >&2
    exit "$code"
}

absolute() {  # a path relative to the repository root, made absolute
    case $1 in /*) echo "$1" ;; *) echo "$REPO/$1" ;; esac
}

[ -f "$REPO/pipeline/train.py" ] ||
    die 2 "no pipeline/train.py under REPO=$REPO: submit from the repository root or set REPO=/path/to/repo"
VENV=$(absolute "${VENV:-.venv}")
PYTHON=$VENV/bin/python
ACCELERATE=$VENV/bin/accelerate
[ -x "$ACCELERATE" ] ||
    die 2 "no accelerate in VENV=$VENV: set VENV to the virtualenv that has the project's requirements"
JOB=$(absolute "$JOB")
RUN_DIR=$(absolute "$RUN_DIR")
[ -z "${DATA_ROOT:-}" ] || DATA_ROOT=$(absolute "$DATA_ROOT")
LAUNCH_CONFIG=$(absolute "${LAUNCH_CONFIG:-jobs/accelerate/multi_node.yaml}")
read -ra TRAIN_SETS <<< "${EXTRA_ARGS:-}"
[ -z "${DATA_ROOT:-}" ] || TRAIN_SETS=(--set "data.root=$DATA_ROOT" "${TRAIN_SETS[@]}")
export REPO JOB RUN_DIR DATA_ROOT VENV LAUNCH_CONFIG EXTRA_ARGS="${EXTRA_ARGS:-}"

pending_stages() {  # checks job, data root and run directory (exit 2 with a message), lists pending stages
    "$PYTHON" "$REPO/slurm/preflight.py" --job "$JOB" --run-dir "$RUN_DIR" "${TRAIN_SETS[@]}"
}

# ---------------------------------------------------------------- submitting stages as chained jobs

submit_chain() {  # submit_chain AFTER_JOB_ID STAGE... (sbatch options in SBATCH_OPTIONS); prints the ids
    local after=$1 stage out err id reason submitted=()
    shift
    err=$(mktemp)
    for stage in "$@"; do
        local dependency=()
        [ -z "$after" ] || dependency=(--dependency="afterok:$after" --kill-on-invalid-dep=yes)
        if ! out=$(STAGE=$stage sbatch --parsable --export=ALL --chdir="$REPO" \
                --job-name="rdinet-$(basename "$TEMPLATE" .sh)-$stage" \
                "${dependency[@]}" "${SBATCH_OPTIONS[@]}" "$TEMPLATE" 2> "$err"); then
            echo "error: sbatch refused the $stage job: $(tr '\n' ' ' < "$err")" >&2
            echo "  check the #SBATCH lines of $TEMPLATE and the options given (nodes, GPUs per node," \
                 "partition, account, time) against what the partition offers: sinfo -s" >&2
            [ ${#submitted[@]} -eq 0 ] || scancel "${submitted[@]}"
            rm -f "$err"
            return 1
        fi
        cat "$err" >&2
        id=${out%%;*}
        submitted+=("$id")
        # Without EnforcePartLimits sbatch accepts a job the partition can never run; it would pend forever.
        reason=$(squeue -h -j "$id" -o %r 2>/dev/null)
        case $reason in PartitionConfig|PartitionNodeLimit|PartitionTimeLimit)
            echo "error: SLURM accepted the $stage job $id but will never start it ($reason):" \
                 "it asks for more nodes, GPUs or time than the partition has." \
                 "Check the #SBATCH lines of $TEMPLATE and the options given against: sinfo -s" >&2
            scancel "${submitted[@]}"
            rm -f "$err"
            return 1 ;;
        esac
        echo "submitted $stage job $id${after:+ (starts after job $after succeeds)}"
        after=$id
    done
    rm -f "$err"
}

this_job_sbatch_options() {  # the allocation of the running job, for the stages it chains after itself
    SBATCH_OPTIONS=(--nodes="$SLURM_JOB_NUM_NODES" --partition="$SLURM_JOB_PARTITION")
    [ -z "${SLURM_JOB_ACCOUNT:-}" ] || SBATCH_OPTIONS+=(--account="$SLURM_JOB_ACCOUNT")
    [ -z "${SLURM_JOB_QOS:-}" ] || SBATCH_OPTIONS+=(--qos="$SLURM_JOB_QOS")
    [ -z "${SLURM_GPUS_PER_NODE:-}" ] || SBATCH_OPTIONS+=(--gpus-per-node="$SLURM_GPUS_PER_NODE")
    [ -z "${SLURM_CPUS_PER_TASK:-}" ] || SBATCH_OPTIONS+=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
    local limit
    limit=$(squeue -h -j "$SLURM_JOB_ID" -o %l)
    case $limit in ""|UNLIMITED|INVALID) ;; *) SBATCH_OPTIONS+=(--time="$limit") ;; esac
}

submit_from_login_node() {  # bash slurm/<template>.sh [sbatch options]
    TEMPLATE=$(realpath "$0")
    SBATCH_OPTIONS=("$@")
    local pending
    pending=$(pending_stages) || exit 2
    if [ -z "$pending" ]; then
        echo "all stages of $JOB are complete in $RUN_DIR: nothing to submit"
        exit 0
    fi
    # shellcheck disable=SC2086  # pending is a list of stage names
    submit_chain "" $pending || exit 1
    echo "logs: $RUN_DIR/logs/<stage>-<jobid>.log"
}

# ---------------------------------------------------------------- running one stage inside a job

say() { echo "[rdinet $(date +%H:%M:%S)] $*"; }

finish() {  # let tee write the last lines, then exit
    exec >&- 2>&-
    wait "$TEE_PID" 2>/dev/null
    exit "$1"
}

stage_complete() { [ -f "$RUN_DIR/$1/final/manifest.json" ]; }

on_stop_signal() {
    STOP_SIGNAL=$1
    SIGNALS_SEEN=$((SIGNALS_SEEN + 1))
    [ -z "$REQUEUEING" ] || return 0
    say "received SIG$1: asking the training processes to checkpoint and stop"
    # SIGTERM to every process of the job's steps (not to this shell); the torchrun agents also
    # forward it to their workers. Each training process checkpoints at its next step, exits 75.
    scancel --signal=TERM "$SLURM_JOB_ID" 2>/dev/null || true
}

check_nodes() {  # the data root must be visible on every node, not only where the job was checked
    [ -n "${DATA_ROOT:-}" ] || return 0
    srun --nodes="$SLURM_JOB_NUM_NODES" --ntasks="$SLURM_JOB_NUM_NODES" --ntasks-per-node=1 \
        bash -c '[ -d "$1" ] || { echo "error: data root $1 does not exist on node $SLURMD_NODENAME:" \
                  "set DATA_ROOT to a folder every node sees"; exit 2; }' check-data "$DATA_ROOT"
}

REQUEUE_MARK=stopped-for-requeue.json  # pipeline/rundir.py: written by rank 0 after a checkpoint for requeue

stopped_for_requeue() {  # did this attempt's training stop after a checkpoint for requeue?
    # The mark, not srun's exit code: srun ends the other nodes' tasks once one has exited non-zero.
    [ -f "$RUN_DIR/$REQUEUE_MARK" ]
}

requeue_this_job() {
    REQUEUEING=1
    say "$STAGE: stopped after a checkpoint; requeueing job $SLURM_JOB_ID to resume from it"
    scontrol requeue "$SLURM_JOB_ID" || { say "error: scontrol requeue failed: resubmit the template to resume"; finish 1; }
    finish 0
}

run_stage() {  # run_stage STAGE, in a job
    STAGE=$1
    STOP_SIGNAL="" SIGNALS_SEEN=0 REQUEUEING=""
    trap 'on_stop_signal USR1' USR1
    trap 'on_stop_signal TERM' TERM
    mkdir -p "$RUN_DIR/logs" || die 2 "cannot create $RUN_DIR/logs: set RUN_DIR to a writable directory"
    LOG=$RUN_DIR/logs/$STAGE-$SLURM_JOB_ID.log
    exec > >(tee -a "$LOG") 2>&1
    TEE_PID=$!
    ATTEMPT="$STAGE job $SLURM_JOB_ID attempt $((${SLURM_RESTART_COUNT:-0} + 1))"
    echo "== $ATTEMPT"
    say "$ATTEMPT on $SLURM_JOB_NODELIST; run $RUN_DIR; job $JOB"
    if stage_complete "$STAGE"; then
        say "$STAGE: already complete ($RUN_DIR/$STAGE/final); nothing to do"
        finish 0
    fi

    if ! check_nodes || [ -n "$STOP_SIGNAL" ]; then
        [ -z "$STOP_SIGNAL" ] || requeue_this_job
        finish 2
    fi

    local gpus=${GPUS_PER_NODE:-${SLURM_GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-0}}}
    gpus=${gpus##*:}  # "a100:4" -> 4
    local per_node=$((gpus > 0 ? gpus : 1))
    export NUM_PROCESSES=$((per_node * SLURM_JOB_NUM_NODES))
    MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
    export MASTER_ADDR MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
    [ "$gpus" -gt 0 ] || export DS_ACCELERATOR=cpu
    # torchrun agents forward SIGUSR1 too, and give their workers STOP_GRACE s to checkpoint.
    export PET_SIGNALS_TO_HANDLE=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1
    export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${STOP_GRACE:-150}
    export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1} NCCL_DEBUG=${NCCL_DEBUG:-WARN}
    say "$SLURM_JOB_NUM_NODES node(s) x $per_node process(es) ($([ "$gpus" -gt 0 ] && echo GPU || echo CPU)), main process $MASTER_ADDR:$MASTER_PORT"

    rm -f "$RUN_DIR/$REQUEUE_MARK"  # left by the attempt that was requeued
    local cpus=()
    [ -z "${SLURM_CPUS_PER_TASK:-}" ] || cpus=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
    # One task per node; $SLURM_NODEID is expanded by each task, not here. A node that dies ends
    # the step (--kill-on-bad-exit); one that exits early leaves the others NODE_EXIT_WAIT s.
    srun --nodes="$SLURM_JOB_NUM_NODES" --ntasks="$SLURM_JOB_NUM_NODES" --ntasks-per-node=1 "${cpus[@]}" \
        --kill-on-bad-exit=1 --wait="${NODE_EXIT_WAIT:-120}" \
        bash -c 'exec "$0" -m pipeline.launch --config_file "$LAUNCH_CONFIG" --num_machines "$SLURM_JOB_NUM_NODES" \
                 --num_processes "$NUM_PROCESSES" --machine_rank "$SLURM_NODEID" \
                 --main_process_ip "$MASTER_ADDR" --main_process_port "$MASTER_PORT" "$@"' \
        "$PYTHON" pipeline/train.py --job "$JOB" --stage "$STAGE" --run-dir "$RUN_DIR" "${TRAIN_SETS[@]}" &
    local srun_pid=$! rc seen=0
    while :; do  # a trapped signal interrupts `wait`; wait again until srun has ended
        wait "$srun_pid"
        rc=$?
        [ "$SIGNALS_SEEN" -gt "$seen" ] || break
        seen=$SIGNALS_SEEN
    done

    if stage_complete "$STAGE"; then
        say "$STAGE: complete ($RUN_DIR/$STAGE/final)"
        finish 0
    fi
    if [ -n "$STOP_SIGNAL" ] || stopped_for_requeue; then
        requeue_this_job
    fi
    say "error: $STAGE failed (srun exit code $rc); see the messages above. Fix the cause and submit" \
        "the template again: it resumes from the last checkpoint."
    finish $((rc == 0 ? 1 : rc))
}

run_in_job() {
    cd "$REPO" || die 2 "cannot enter $REPO"
    if [ -n "${STAGE:-}" ]; then  # submitted by submit_chain: this job is one stage
        run_stage "$STAGE"
    fi
    # `sbatch slurm/<template>.sh`: run the first pending stage, chain the others after this job.
    local pending
    pending=$(pending_stages) || exit 2
    if [ -z "$pending" ]; then
        echo "all stages of $JOB are complete in $RUN_DIR: nothing to do"
        exit 0
    fi
    # shellcheck disable=SC2086
    set -- $pending
    if [ "${SLURM_RESTART_COUNT:-0}" -eq 0 ] && [ $# -gt 1 ]; then  # a requeued job chained them already
        TEMPLATE=$(scontrol show job "$SLURM_JOB_ID" | grep -o 'Command=[^ ]*' | cut -d= -f2)
        this_job_sbatch_options
        submit_chain "$SLURM_JOB_ID" "${@:2}" || exit 1
    fi
    run_stage "$1"
}

# sbatch runs a spooled copy of the template; `bash slurm/<template>.sh` runs the file itself.
if [ -n "${SLURM_JOB_ID:-}" ] && [ "$(dirname "$(realpath "$0")")" != "$(realpath "$REPO/slurm")" ]; then
    run_in_job
else
    submit_from_login_node "$@"
fi
