#!/usr/bin/env bash
# Run artdist training with torchrun: under sbatch (one torchrun per node, requeued on time limit or
# preemption), on a workstation (all local GPUs, or 2 CPU processes), or the CPU demo end to end.
#
# Every #SBATCH default below can be overridden on the sbatch command line.
#SBATCH --job-name=artdist
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=1
#SBATCH --cpus-per-task=8
#SBATCH --time=04:00:00
#SBATCH --signal=B:USR2@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
set -euo pipefail

usage() {
    cat <<'EOF'
Usage:
  ./launch.sh                                   the CPU demo: synth, shard, train (DDP), evaluate
  ./launch.sh jobs/X.yaml [--set KEY=VALUE ...] train on this machine: torchrun --standalone with one
                                                process per local GPU, or 2 CPU processes without GPUs
  sbatch [OPTIONS] launch.sh jobs/X.yaml [--set KEY=VALUE ...]
                                                train on SLURM: one torchrun per node, one process per
                                                allocated GPU (1 on CPU-only nodes)

sbatch defaults (override on the sbatch command line, e.g. sbatch --nodes=2 --gpus-per-node=8):
  --job-name=artdist --nodes=1 --ntasks-per-node=1 --gpus-per-node=1 --cpus-per-task=8
  --time=04:00:00 --signal=B:USR2@120 --requeue --open-mode=append --output=slurm-%x-%j.out
The log goes to the submit directory; RUN_DIR/slurm/ gets a link to it.

Under SLURM, USR2 (sent 120 s before the time limit, or by `scancel --signal=USR2 --batch JOBID`)
makes training save RUN_DIR/model_last.pt after the current step and stop; the job is then requeued
and resumes there, at most slurm.max_num_timeout times. Running the same command again also resumes.

Environment:
  ARTDIST_NPROC=N    processes per node (default: GPUs, see above)
  ARTDIST_VENV=DIR   virtual environment to activate (default: ./.venv if it exists)
  ARTDIST_DRY_RUN=1  print the training commands instead of running them
EOF
}

say() { echo "launch.sh: $*"; }
die() { echo "launch.sh: error: $*" >&2; exit 2; }

run() {  # run CMD...: run it, or print it under ARTDIST_DRY_RUN=1
    if [[ ${ARTDIST_DRY_RUN:-0} == 1 ]]; then
        printf '+'
        printf ' %q' "$@"
        echo
    else
        "$@"
    fi
}

# resolve CONFIG [--set K=V ...]: validate the job config (one-line errors from `artdist config`)
# and print the fields this script needs, one per line: run dir, epochs, max requeues, synth dir,
# shards dir.
resolve() {
    local yaml
    yaml=$(python -m artdist config --config "$@") || return 2
    python -c '
import sys, yaml
from artdist.config import from_dict
cfg = from_dict(yaml.safe_load(sys.stdin))
print(cfg.run_dir, cfg.train.epochs, cfg.slurm.max_num_timeout, cfg.synth.out, cfg.shard.out, sep="\n")' <<<"$yaml"
}

# finished RUN_DIR EPOCHS: RUN_DIR/model_last.pt has completed EPOCHS epochs.
finished() {
    python -c '
import sys
from artdist.train.checkpoint import latest_checkpoint, load_checkpoint
last = latest_checkpoint(sys.argv[1])
sys.exit(0 if last and load_checkpoint(last)["epoch"] >= int(sys.argv[2]) else 1)' "$1" "$2"
}

train_local() {  # train_local CONFIG [--set ...]
    local nproc=${ARTDIST_NPROC:-$(python -c 'import torch; print(torch.cuda.device_count())')}
    ((nproc > 0)) || nproc=2  # no GPU: 2 CPU processes (gloo), so DDP is exercised anyway
    run torchrun --standalone --nproc_per_node="$nproc" -m artdist train --config "$@"
}

# train_slurm RUN_DIR EPOCHS MAX_REQUEUES CONFIG [--set ...]: one torchrun per node; on USR2, ask
# training to save and stop through the stop file, then requeue unless training has finished.
train_slurm() {
    local run_dir=$1 epochs=$2 max_requeues=$3
    shift 3
    local nproc=${ARTDIST_NPROC:-${SLURM_GPUS_ON_NODE:-1}}
    local head port log
    head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
    port=$((20000 + SLURM_JOB_ID % 20000))  # per job, so jobs sharing a node do not collide
    log=$(scontrol show job "$SLURM_JOB_ID" | sed -n 's/^ *StdOut=//p')
    mkdir -p "$run_dir/slurm"
    ln -sfn "$log" "$run_dir/slurm/${log##*/}"
    rm -f "$run_dir/PREEMPT"
    say "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}): $SLURM_NNODES node(s) x $nproc process(es)," \
        "run dir $run_dir, log $log"

    local notice=0 pid status=0
    trap 'notice=1; say "USR2: asking training to save and stop"' USR2
    # srun does not pass the job's --cpus-per-task on to the step (SLURM 22.05+): say it again.
    run srun --nodes="$SLURM_NNODES" --ntasks-per-node=1 ${SLURM_CPUS_PER_TASK:+--cpus-per-task=$SLURM_CPUS_PER_TASK} \
        --kill-on-bad-exit=1 \
        torchrun --nnodes="$SLURM_NNODES" --nproc_per_node="$nproc" --rdzv_backend=c10d \
        --rdzv_endpoint="$head:$port" --rdzv_id="$SLURM_JOB_ID" -m artdist train --config "$@" &
    pid=$!
    # Poll instead of blocking on srun: the trap runs between polls, and the stop file is touched
    # again on every poll after a notice, because a trainer that is still starting up deletes it.
    while kill -0 "$pid" 2>/dev/null; do
        ((notice)) && touch "$run_dir/PREEMPT"
        sleep 2 &
        wait $! || true
    done
    wait "$pid" || status=$?
    # The trap stays: a notice that arrives now must not kill this shell before it can requeue.

    if ((status != 0)); then
        say "training exited with status $status; not requeued"
        return "$status"
    fi
    if ((notice == 0)) || finished "$run_dir" "$epochs"; then
        return 0
    fi
    if ((${SLURM_RESTART_COUNT:-0} >= max_requeues)); then
        # Not 0: training has not finished, and e.g. --dependency=afterok must not take it as done.
        say "saved, but this job was already requeued ${SLURM_RESTART_COUNT} times (slurm.max_num_timeout):" \
            "not requeued; submit the same command again to resume from $run_dir/model_last.pt"
        return 3
    fi
    say "saved $run_dir/model_last.pt; requeueing job $SLURM_JOB_ID to resume from it"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0  # SLURM is ending this run of the job anyway: nothing below applies to it
}

prepare_demo_data() {  # prepare_demo_data CONFIG SYNTH_DIR SHARDS_DIR: synth and shard unless done before
    # synth writes planted_noise.csv last, so its presence means a complete corpus.
    if [[ -f $2/planted_noise.csv ]]; then
        say "$2 is complete: skipping artdist synth"
    else
        run python -m artdist synth --config "$1"
    fi
    if [[ -f $3/manifest.json ]]; then
        say "$3/manifest.json exists: skipping artdist shard"
    else
        run python -m artdist shard --config "$1"
    fi
}

main() {
    if [[ ${1:-} == -h || ${1:-} == --help ]]; then
        usage
        return 0
    fi
    if [[ -n ${ARTDIST_VENV:-} ]]; then
        [[ -f $ARTDIST_VENV/bin/activate ]] || die "ARTDIST_VENV=$ARTDIST_VENV has no bin/activate"
        # shellcheck disable=SC1091
        source "$ARTDIST_VENV/bin/activate"
    elif [[ -f .venv/bin/activate ]]; then
        # shellcheck disable=SC1091
        source .venv/bin/activate
    fi
    command -v python >/dev/null || die "no python on PATH: activate the artdist venv or set ARTDIST_VENV"

    local demo=0 config
    if (($# == 0)); then
        demo=1
        config=jobs/demo.yaml
    else
        config=$1
        shift
    fi
    [[ -f $config ]] || die "job config $config not found (run from the artdist checkout; configs live in jobs/)"
    local args=("$config")
    while (($#)); do
        [[ $1 == --set && $# -ge 2 ]] || die "unexpected argument '$1': only --set KEY=VALUE may follow the config"
        args+=(--set "$2")
        shift 2
    done
    local fields
    fields=$(resolve "${args[@]}") || exit 2
    mapfile -t fields <<<"$fields"
    local run_dir=${fields[0]} epochs=${fields[1]} max_requeues=${fields[2]}

    ((demo)) && prepare_demo_data "$config" "${fields[3]}" "${fields[4]}"
    if [[ -n ${SLURM_JOB_ID:-} ]]; then
        train_slurm "$run_dir" "$epochs" "$max_requeues" "${args[@]}"
    else
        train_local "${args[@]}"
    fi
    # The copies among the paintings: the shard-time hash groups beside the embedding near-duplicates.
    ((demo)) && run python -m artdist duplicates --run "$run_dir"
    say "run directory: $run_dir"
    # Training ends with the test evaluation and the validation outlier reports (both printed above).
    ((demo)) && say "  test evaluation: $run_dir/eval_test.json; outliers: $run_dir/outliers/val/index.html; duplicates: $run_dir/duplicates/index.html"
    say "watch it with: tensorboard --logdir $run_dir/tb"
}

main "$@"
