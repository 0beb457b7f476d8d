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
  ./launch.sh --sbatch jobs/X.yaml [--set KEY=VALUE ...]
                                                submit to SLURM with the config's slurm: resources (as
                                                artdist submit asks for them)
  sbatch [OPTIONS] launch.sh jobs/X.yaml [--set KEY=VALUE ...]
                                                train on SLURM: one torchrun per node, one process per
                                                allocated GPU (1 on CPU-only nodes); the job says where it
                                                differs from the config's slurm: section

sbatch defaults (override on the sbatch command line, e.g. sbatch --nodes=2 --gpus-per-node=8):
  --job-name=artdist --nodes=1 --ntasks-per-node=1 --gpus-per-node=1 --cpus-per-task=8
  --time=04:00:00 --signal=B:USR2@120 --requeue --open-mode=append --output=slurm-%x-%j.out
The log goes to the submit directory; RUN_DIR/slurm/ gets a link to it.

Under SLURM, USR2 (sent 120 s before the time limit, or by `scancel --signal=USR2 --batch JOBID`)
makes training save RUN_DIR/model_last.pt after the current step and stop; the job is then requeued
and resumes there, at most slurm.max_num_timeout times. Running the same command again also resumes.

A multi-node job meets on the first node (port 20000 + job id % 20000); each node checks that it can
reach it, and uses the network interface that does for gloo (GLOO_SOCKET_IFNAME, unless set).

Environment:
  ARTDIST_NPROC=N    processes per node (default: GPUs, see above)
  ARTDIST_MAX_RESTARTS=N  torchrun restarts of all processes after one fails (default 0); they
                     resume from RUN_DIR/model_last.pt (train.checkpoint_every: how often it is saved)
  ARTDIST_RDZV_HOST=H     rendezvous host, an address of the first node (default: its name)
  ARTDIST_RDZV_TIMEOUT=S  how long the other nodes wait for the rendezvous (default 600 s)
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
# shards dir, then from the slurm: section nodes, processes per node, CPUs per node (slurm.cpus_per_task
# is per process, as in `artdist submit`) and the sbatch options that ask for all that.
resolve() {
    local yaml
    yaml=$(python -m artdist config --config "$@") || return 2
    python -c '
import sys, yaml
from artdist.config import from_dict
cfg = from_dict(yaml.safe_load(sys.stdin))
s = cfg.slurm
procs = max(s.gpus_per_node, 1)  # as artdist submit: on CPU, gpus_per_node counts processes
gpus = 0 if cfg.train.device == "cpu" else s.gpus_per_node
sbatch = [f"--nodes={s.nodes}", f"--gpus-per-node={gpus}", f"--cpus-per-task={s.cpus_per_task * procs}",
          f"--time={s.time_min}", f"--signal=B:USR2@{s.signal_delay_s}"]
sbatch += [f"--{key}={value}" for key, value in (("partition", s.partition), ("account", s.account),
                                                 ("qos", s.qos), ("constraint", s.constraint)) if value]
sbatch += [f"--mem={s.mem_gb}G"] if s.mem_gb else []
print(cfg.run_dir, cfg.train.epochs, s.max_num_timeout, cfg.synth.out, cfg.shard.out, s.nodes, procs,
      s.cpus_per_task * procs, *sbatch, sep="\n")' <<<"$yaml"
}

# finished RUN_DIR EPOCHS: RUN_DIR/model_last.pt has completed EPOCHS epochs.
finished() {
    python -c '
import sys
from artdist.train.checkpoint import latest_checkpoint, load_checkpoint
last = latest_checkpoint(sys.argv[1])
sys.exit(0 if last and load_checkpoint(last)["epoch"] >= int(sys.argv[2]) else 1)' "$1" "$2"
}

# torchrun's agents share one TCPStore with their workers and keep it across restarts, without a
# per-restart key prefix: restarted workers read the dead workers' gloo addresses from it and fail
# with "Gloo connectFullMesh failed ... Connection refused" (or hang). Without the sharing, every
# restart round gets a fresh store on a new port (docs/cluster.md, "Restarts"). Both torchrun
# commands below run under `env TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1` for this reason.

train_local() {  # train_local CONFIG [--set ...]
    local nproc=${ARTDIST_NPROC:-$(python -c 'import torch; print(torch.cuda.device_count())')}
    ((nproc > 0)) || nproc=2  # no GPU: 2 CPU processes (gloo), so DDP is exercised anyway
    run env TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 torchrun --standalone --nproc_per_node="$nproc" \
        --max-restarts="${ARTDIST_MAX_RESTARTS:-0}" -m artdist train --config "$@"
}

# node_main HOST PORT NPROC CONFIG [--set ...]: one per node (srun task). Checks that the rendezvous
# HOST:PORT can be reached, picks the network interface for gloo, runs this node's torchrun, and
# turns a failure into one line naming the node and the rank.
node_main() {
    local host=$1 port=$2 nproc=$3
    shift 3
    local node addr ifname timeout=${ARTDIST_RDZV_TIMEOUT:-600}
    node=$(hostname -s)
    addr=$(getent ahostsv4 "$host" | awk 'NR == 1 {print $1}')
    [[ -n $addr ]] || die "$node: cannot resolve the rendezvous host '$host'; set ARTDIST_RDZV_HOST to an" \
        "address of the job's first node that every node can reach"
    if [[ -z ${GLOO_SOCKET_IFNAME:-} ]]; then
        # The interface this node reaches the rendezvous host through (on that host: the one that
        # holds its address). gloo's default, the address of this node's host name, is loopback on
        # many installs (127.0.1.1), which other nodes cannot connect to.
        ifname=$(python -c 'import sys; from artdist.dist import route_interface; print(route_interface(sys.argv[1]) or "")' "$addr")
        [[ -n $ifname && $ifname != lo ]] && export GLOO_SOCKET_IFNAME=$ifname
    fi
    say "$node (node ${SLURM_NODEID:-0}): rendezvous $host:$port ($addr), gloo interface" \
        "${GLOO_SOCKET_IFNAME:-from the host name}, $nproc process(es)"
    if ((${SLURM_NODEID:-0} != 0)); then
        # The first node hosts the rendezvous; the others wait for it, then give up with one line.
        local deadline=$((SECONDS + timeout))
        until timeout 5 bash -c ": >/dev/tcp/$addr/$port" 2>/dev/null; do
            ((SECONDS < deadline)) || die "$node: the rendezvous $host:$port ($addr) did not answer within" \
                "${timeout} s (ARTDIST_RDZV_TIMEOUT): is the first node up, and is the port open between nodes?"
            sleep 1
        done
    fi
    local errors status=0
    errors=$(mktemp)
    env TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 torchrun --nnodes="$SLURM_NNODES" --nproc_per_node="$nproc" \
        --max-restarts="${ARTDIST_MAX_RESTARTS:-0}" --rdzv_backend=c10d --rdzv_endpoint="$host:$port" \
        --rdzv_id="$SLURM_JOB_ID" --rdzv_conf="is_host=$((${SLURM_NODEID:-0} == 0)),join_timeout=$timeout" \
        -m artdist train --config "$@" 2> >(tee "$errors" >&2) || status=$?
    wait $! 2>/dev/null || true  # the tee
    if ((status != 0)); then
        # torchrun's failure summary ("Root Cause" block) names the first rank that failed.
        awk -v node="$node" -v status="$status" '
            /Root Cause/ {cause = 1}
            cause && match($0, /^ *[a-z_]+ *: /) {
                key = $0; sub(/ *: .*/, "", key); gsub(/ /, "", key); value = substr($0, RLENGTH + 1)
                if (key == "host") host = value
                if (key == "rank") rank = value
                if (key == "exitcode") code = value
                if (key == "traceback") { how = value; exit }
            }
            END {
                if (rank == "") { printf "launch.sh: error: %s: torchrun exited with status %s (see above)\n", node, status; exit }
                if (how !~ /^Signal/) how = "exit code " code
                printf "launch.sh: error: %s: rank %s failed (%s); torchrun exited with status %s\n", host, rank, how, status
            }' "$errors" >&2
    fi
    rm -f "$errors"
    return "$status"
}

# train_slurm RUN_DIR EPOCHS MAX_REQUEUES NODES PROCS CPUS CONFIG [--set ...]: one torchrun per node;
# on USR2, ask training to save and stop through the stop file, then requeue unless training has
# finished. NODES PROCS CPUS: what the config's slurm: section asks for (said when the job differs).
train_slurm() {
    local run_dir=$1 epochs=$2 max_requeues=$3 want_nodes=$4 want_procs=$5 want_cpus=$6
    shift 6
    local nproc=${ARTDIST_NPROC:-${SLURM_GPUS_ON_NODE:-1}}
    local differ=()
    ((SLURM_NNODES == want_nodes)) || differ+=("$SLURM_NNODES node(s) (config: $want_nodes)")
    ((nproc == want_procs)) || differ+=("$nproc process(es) per node (config: $want_procs)")
    [[ ${SLURM_CPUS_PER_TASK:-} == "$want_cpus" ]] ||
        differ+=("${SLURM_CPUS_PER_TASK:-default} CPUs per node (config: $want_cpus = slurm.cpus_per_task x processes)")
    ((${#differ[@]} == 0)) || say "note: this job differs from the config's slurm: section: $(IFS=,; echo "${differ[*]}" | sed 's/,/, /g');" \
        "./launch.sh --sbatch CONFIG submits with the config's resources"
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
    export -f node_main say die
    # srun does not pass the job's --cpus-per-task on to the step (SLURM 22.05+): say it again.
    run srun --nodes="$SLURM_NNODES" --ntasks-per-node=1 ${SLURM_CPUS_PER_TASK:+--cpus-per-task=$SLURM_CPUS_PER_TASK} \
        --kill-on-bad-exit=1 bash -c 'node_main "$@"' node_main \
        "${ARTDIST_RDZV_HOST:-$head}" "$port" "$nproc" "$@" &
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

    local demo=0 submit=0 config
    if [[ ${1:-} == --sbatch ]]; then
        submit=1
        shift
        (($#)) || die "--sbatch wants a job config: ./launch.sh --sbatch jobs/X.yaml [--set KEY=VALUE ...]"
    fi
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

    if ((submit)); then
        # The config's resources; #SBATCH lines in this script only fill in what these leave out.
        run sbatch "${fields[@]:8}" --export="ALL,ARTDIST_NPROC=${ARTDIST_NPROC:-${fields[6]}}" "$0" "${args[@]}"
        return 0
    fi
    ((demo)) && prepare_demo_data "$config" "${fields[3]}" "${fields[4]}"
    if [[ -n ${SLURM_JOB_ID:-} ]]; then
        train_slurm "$run_dir" "$epochs" "$max_requeues" "${fields[@]:5:3}" "${args[@]}"
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
