#!/usr/bin/env bash
# Stop the SLURM that .ci/slurm-up.sh started: cancel every job, wait for the jobs' steps to end,
# then stop each node's slurmd, slurmctld, slurmdbd, MariaDB and munged by their own PIDs, and
# remove the nodes' network namespaces, their links and the bridge (multi-node clusters).
# State, logs and the accounting database stay in $ARTDIST_SLURM_DIR, so job ids keep counting up.
set -euo pipefail

SCRATCH=${ARTDIST_SLURM_DIR:-/tmp/artdist-slurm}
RUN=$SCRATCH/run

say() { echo "slurm-down: $*"; }

stop() {  # stop NAME PIDFILE: SIGTERM the process in PIDFILE and wait for it to exit
    local name=$1 pidfile=$2 pid
    if [[ ! -s $pidfile ]] || ! kill -0 "$(cat "$pidfile")" 2>/dev/null; then
        say "$name not running"
        return
    fi
    pid=$(cat "$pidfile")
    kill -TERM "$pid"
    for ((i = 0; i < 60; i++)); do
        kill -0 "$pid" 2>/dev/null || { say "stopped $name (pid $pid)"; return; }
        sleep 0.5
    done
    echo "slurm-down: error: $name (pid $pid) is still running 30s after SIGTERM" >&2
    exit 1
}

# Jobs first: a slurmstepd orphaned by an early slurmctld stop ignores SIGTERM.
if scontrol ping >/dev/null 2>&1; then
    mapfile -t jobs < <(squeue -h -o %A)
    if ((${#jobs[@]})); then
        say "cancelling jobs: ${jobs[*]}"
        scancel "${jobs[@]}"
    fi
    for ((i = 0; i < 120; i++)); do
        [[ -z $(squeue -h -o %A) ]] && ! pgrep -x slurmstepd >/dev/null && break
        sleep 0.5
    done
    if [[ -n $(squeue -h -o %A) ]] || pgrep -x slurmstepd >/dev/null; then
        echo "slurm-down: error: jobs or slurmstepd still there 60s after scancel: $(squeue -h -o '%A %T')" >&2
        exit 1
    fi
fi

shopt -s nullglob
for pidfile in "$RUN"/slurmd*.pid; do  # slurmd-<node>.pid, and slurmd.pid of older single-node layouts
    name=${pidfile##*/}
    stop "${name%.pid}" "$pidfile"
done
stop slurmctld "$RUN/slurmctld.pid"
stop slurmdbd "$RUN/slurmdbd.pid"
stop mariadb "$SCRATCH/mariadb.pid"
stop munged /run/munge/munged.pid

# The multi-node network (slurm-up.sh --nodes N): its own names only. Deleting a namespace deletes
# the node's end of its veth pair, and with it this machine's end.
for ns in $(ip netns list 2>/dev/null | awk '$1 ~ /^artdist-node[0-9]+$/ {print $1}'); do
    ip netns del "$ns" && say "removed node namespace $ns"
done
for veth in $(ip -o link show 2>/dev/null | awk -F': ' '$2 ~ /^artdist-v[0-9]+@/ {sub(/@.*/, "", $2); print $2}'); do
    ip link del "$veth" 2>/dev/null && say "removed link $veth"  # usually gone with its namespace
done
if ip link show artdist-br0 >/dev/null 2>&1; then
    ip link del artdist-br0 && say "removed bridge artdist-br0"
fi
rm -f "$RUN/nodes"
