# Shared part of the sbatch scripts: offline assets, stop-signal forwarding, requeue.
# Sourced by single_node.sbatch and multi_node.sbatch, which set three arrays: LAUNCH
# (the torchrun command), SRUN_ARGS (srun options) and STAGE_ARGS (stage, config, overrides).

set -euo pipefail

EXIT_REQUEUE=75  # common.rundir.EXIT_REQUEUE: the stage wrote a checkpoint and stopped on a signal

# Compute nodes have no internet: every asset comes from the folders filled on the login node.
ASSETS=${ASSETS:-$SLURM_SUBMIT_DIR/assets}
export HF_HUB_OFFLINE=1
export HF_HOME=${HF_HOME:-$ASSETS/huggingface}
export TORCH_HOME=${TORCH_HOME:-$ASSETS/torch}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}

# `#SBATCH --signal=B:USR1@120` signals this batch shell only. torchrun itself would die
# on SIGUSR1 (it handles TERM, INT, HUP and QUIT only), so the ranks start with USR1
# ignored (an ignored signal stays ignored across exec) and the stage's own handler
# re-enables it. The trap then sends USR1 to every process of the job steps: torchrun
# ignores it and each rank writes a checkpoint at the next step and exits with 75.
STOP_REQUESTED=0
forward_stop() {
    STOP_REQUESTED=1
    echo "$(date '+%F %T') batch shell received a stop signal; sending SIGUSR1 to the ranks of job $SLURM_JOB_ID"
    scancel --signal=USR1 "$SLURM_JOB_ID" || true
}
trap forward_stop USR1 TERM

run_stage_and_requeue() {
    local quoted
    quoted=$(printf '%q ' "${LAUNCH[@]}" "${STAGE_ARGS[@]}")
    echo "$(date '+%F %T') job $SLURM_JOB_ID on $SLURM_JOB_NODELIST: $quoted"
    srun --kill-on-bad-exit=1 "${SRUN_ARGS[@]}" bash -c "trap '' USR1; exec $quoted" &
    local step_pid=$! rc=0
    # `wait` returns early (status > 128) whenever the trap runs; wait again until srun ends.
    while true; do
        rc=0
        wait "$step_pid" || rc=$?
        kill -0 "$step_pid" 2>/dev/null || break
    done

    # torchrun exits 1 when a rank fails, so a rank's 75 may not reach this shell. The
    # flag set by the trap therefore decides too, but a run that finished (rc 0) stays done.
    if [[ $rc -eq $EXIT_REQUEUE || ( $STOP_REQUESTED -eq 1 && $rc -ne 0 ) ]]; then
        echo "$(date '+%F %T') stage stopped with a checkpoint (exit $rc); requeueing job $SLURM_JOB_ID"
        scontrol requeue "$SLURM_JOB_ID"
        exit 0
    fi
    echo "$(date '+%F %T') stage exited with $rc"
    exit "$rc"
}
