#!/usr/bin/env bash
# Start a SLURM cluster on this machine (slurmctld + slurmdbd with MariaDB, munge auth, and one slurmd
# per node) for the `slurm` tests; installs Debian's packages when missing. Idempotent: what is
# already running is left alone. Needs root. Stop it with .ci/slurm-down.sh.
#
#   .ci/slurm-up.sh              one node, `localhost` (127.0.0.1)
#   .ci/slurm-up.sh --nodes N    N nodes artdist-node1..N, each a network namespace with its own
#                                address 10.213.0.(10+i) on the bridge artdist-br0 (10.213.0.1, this
#                                machine's side) and its own host name (a UTS namespace). The nodes
#                                share this machine's file system, as cluster nodes share one.
#
# Everything lives under $ARTDIST_SLURM_DIR (default /tmp/artdist-slurm): config, state, spool,
# logs, pid files and the accounting database. /etc/slurm/*.conf are symlinks to that config so
# that sinfo/sbatch/scontrol find it without SLURM_CONF; a real site config there is never touched.
set -euo pipefail

SCRATCH=${ARTDIST_SLURM_DIR:-/tmp/artdist-slurm}
ETC=$SCRATCH/etc
RUN=$SCRATCH/run
LOG=$SCRATCH/log
DB_SOCKET=$RUN/mysql/mysqld.sock

say() { echo "slurm-up: $*"; }
die() { echo "slurm-up: error: $*" >&2; exit 1; }

NODES=1
while (($#)); do
    case $1 in
        --nodes) [[ ${2:-} =~ ^[1-9][0-9]?$ ]] || die "--nodes wants a number of nodes (1-99), got '${2:-}'"
                 NODES=$2; shift 2 ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument '$1' (usage: slurm-up.sh [--nodes N])" ;;
    esac
done
# The multi-node layout: names and addresses that only this script creates (slurm-down.sh removes them).
BRIDGE=artdist-br0
SUBNET=10.213.0
CTL_ADDR=$SUBNET.1
node_name() { echo "artdist-node$1"; }   # also its network namespace's name
node_addr() { echo "$SUBNET.$((10 + $1))"; }
node_veth() { echo "artdist-v$1"; }      # this machine's end of the node's link; eth0 inside the node

running() {  # running PIDFILE: the process named in PIDFILE is alive
    [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null
}

wait_for() {  # wait_for SECONDS WHAT CMD...: poll CMD until it succeeds
    local seconds=$1 what=$2
    shift 2
    for ((i = 0; i < seconds * 2; i++)); do
        "$@" >/dev/null 2>&1 && return 0
        sleep 0.5
    done
    die "$what did not come up within ${seconds}s; see the logs in $LOG"
}

write_conf() {  # write_conf FILE < TEXT: replace FILE when TEXT differs; remember that it changed
    local text
    text=$(cat)
    [[ -f $1 && $(cat "$1") == "$text" ]] && return
    printf '%s\n' "$text" >"$1"
    CHANGED+=("${1##*/}")
}

start_daemon() {  # start_daemon NAME PIDFILE CMD...: detach CMD (own session) unless already running
    local name=$1 pidfile=$2
    shift 2
    if running "$pidfile"; then
        say "$name already running (pid $(cat "$pidfile"))"
        return
    fi
    setsid "$@" >>"$LOG/$name.out" 2>&1 </dev/null &
    echo $! >"$pidfile"
    say "started $name (pid $!)"
}

[[ $(id -u) == 0 ]] || die "needs root (it installs packages and starts munged/slurmd); run it with sudo"

# ---------------------------------------------------------------- packages
missing=()
for tool in slurmctld slurmd slurmdbd sbatch munged mariadbd mariadb; do
    command -v "$tool" >/dev/null || missing+=("$tool")
done
if ((${#missing[@]})); then
    command -v apt-get >/dev/null || die "slurm/munge/mariadb are missing and there is no apt-get to install them"
    say "missing ${missing[*]}: installing slurm-wlm slurmdbd munge mariadb-server (about a minute)"
    apt-get update -qq || die "apt-get update failed (no package mirror reachable?)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        slurm-wlm slurmdbd munge mariadb-server mariadb-client >/dev/null \
        || die "apt-get install failed; see the output above"
else
    say "slurm, munge and mariadb already installed"
fi

# ---------------------------------------------------------------- config
mkdir -p "$ETC" "$RUN" "$LOG" "$SCRATCH/state"
CPUS=$(nproc)
MEM_MB=$(($(awk '/^MemTotal:/ {print $2}' /proc/meminfo) * 9 / 10 / 1024))  # below the real size, else slurmd drains the node

if ((NODES == 1)); then
    CTL_HOST=localhost
    NODE_LINES="NodeName=localhost NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN"
    NODE_LIST=localhost
else
    # slurmctld stays on this machine; the nodes reach it on the bridge.
    CTL_HOST="localhost($CTL_ADDR)"
    NODE_LINES=""
    for ((i = 1; i <= NODES; i++)); do
        # Every node sees all of this machine's cores; the memory is split between them.
        NODE_LINES+="NodeName=$(node_name "$i") NodeAddr=$(node_addr "$i") CPUs=$CPUS RealMemory=$((MEM_MB / NODES)) State=UNKNOWN"$'\n'
    done
    NODE_LIST="artdist-node[1-$NODES]"
fi

CHANGED=()
write_conf "$ETC/slurm.conf" <<EOF
ClusterName=artdist
SlurmctldHost=$CTL_HOST
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
# A requeued job waits cred_expire+1 s before it may start again (default 120 s): shorter here
# so the preemption tests do not idle.
AuthInfo=cred_expire=20
StateSaveLocation=$SCRATCH/state
# One slurmd per node: %n is the node's name.
SlurmdSpoolDir=$SCRATCH/spool/%n
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd-%n.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
# No mailer here; the default MailProg path makes slurmctld log an error.
MailProg=/bin/true
ReturnToService=2
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
JobAcctGatherType=jobacct_gather/none
${NODE_LINES%$'\n'}
PartitionName=debug Nodes=$NODE_LIST Default=YES MaxTime=INFINITE State=UP
EOF

write_conf "$ETC/cgroup.conf" <<EOF
# proctrack/linuxproc + task/none: no cgroup plugin is used; nothing to constrain here.
ConstrainCores=no
ConstrainRAMSpace=no
ConstrainDevices=no
EOF

write_conf "$ETC/slurmdbd.conf" <<EOF
AuthType=auth/munge
DbdHost=localhost
SlurmUser=root
PidFile=$RUN/slurmdbd.pid
LogFile=$LOG/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
EOF
chmod 600 "$ETC/slurmdbd.conf"  # slurmdbd refuses a readable password file

mkdir -p /etc/slurm
for conf in slurm.conf cgroup.conf slurmdbd.conf; do
    if [[ -e /etc/slurm/$conf && ! -L /etc/slurm/$conf ]]; then
        die "/etc/slurm/$conf is a real file (a site config?); not replacing it"
    fi
    ln -sfn "$ETC/$conf" "/etc/slurm/$conf"
done
say "config in $ETC (linked from /etc/slurm): $NODES node(s) $NODE_LIST, $CPUS CPUs each"

# ---------------------------------------------------------------- munge
if [[ ! -s /etc/munge/munge.key ]]; then
    mkdir -p /etc/munge
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    say "created /etc/munge/munge.key"
fi
chown munge:munge /etc/munge/munge.key
chmod 400 /etc/munge/munge.key
mkdir -p /run/munge /var/lib/munge /var/log/munge
chown munge:munge /run/munge /var/lib/munge /var/log/munge
if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    say "munged already running"
else
    runuser -u munge -- munged || die "munged did not start; see /var/log/munge/munged.log"
    say "started munged"
fi

# ---------------------------------------------------------------- accounting: mariadb + slurmdbd
if [[ ! -d $SCRATCH/mysql/mysql ]]; then
    mkdir -p "$SCRATCH/mysql"
    chown mysql:mysql "$SCRATCH/mysql"
    mariadb-install-db --user=mysql --datadir="$SCRATCH/mysql" --auth-root-authentication-method=socket \
        >"$LOG/mariadb-install.out" 2>&1 || die "mariadb-install-db failed; see $LOG/mariadb-install.out"
    say "initialised the accounting database in $SCRATCH/mysql"
fi
install -d -o mysql -g mysql "$RUN/mysql" "$LOG/mariadb"
start_daemon mariadb "$SCRATCH/mariadb.pid" mariadbd --no-defaults --user=mysql --datadir="$SCRATCH/mysql" \
    --socket="$DB_SOCKET" --bind-address=127.0.0.1 --port=3306 --log-error="$LOG/mariadb/error.log"
wait_for 30 mariadb mariadb --socket="$DB_SOCKET" -e "SELECT 1"
mariadb --socket="$DB_SOCKET" -e "
    CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurm';
    CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurm';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';" || die "could not create the slurm database user"

start_daemon slurmdbd "$RUN/slurmdbd.pid" slurmdbd -D
wait_for 30 slurmdbd sacctmgr -n list cluster
if [[ -z $(sacctmgr -n list cluster artdist format=cluster) ]]; then
    sacctmgr -i add cluster artdist >/dev/null || die "could not register cluster artdist with slurmdbd"
    say "registered cluster artdist in the accounting database"
fi

# ---------------------------------------------------------------- network: one namespace per node
# Node i: network namespace artdist-node<i>, its eth0 = one end of a veth pair whose other end is
# on the bridge; every node resolves the others' names through $ETC/hosts (bind-mounted over
# /etc/hosts inside the node only).
if ((NODES > 1)); then
    command -v ip >/dev/null || die "--nodes $NODES needs the ip command (Debian: apt-get install iproute2)"
    {
        printf '127.0.0.1\tlocalhost\n::1\tlocalhost\n%s\tartdist-ctl\n' "$CTL_ADDR"
        # The ::ffff: forms: a TCPStore server sees its IPv4 clients as IPv4-mapped IPv6 addresses
        # and looks their names up (a warning per connection when that fails).
        for ((i = 1; i <= NODES; i++)); do
            printf '%s\t%s\n::ffff:%s\t%s\n' "$(node_addr "$i")" "$(node_name "$i")" "$(node_addr "$i")" "$(node_name "$i")"
        done
    } >"$ETC/hosts"
    if ! ip link show "$BRIDGE" >/dev/null 2>&1; then
        ip link add "$BRIDGE" type bridge || die "cannot create the bridge $BRIDGE (needs CAP_NET_ADMIN)"
        ip addr add "$CTL_ADDR/24" dev "$BRIDGE"
        say "created bridge $BRIDGE ($CTL_ADDR/24)"
    fi
    ip link set "$BRIDGE" up
    for ((i = 1; i <= NODES; i++)); do
        ns=$(node_name "$i") veth=$(node_veth "$i")
        if ! ip netns list | grep -qx "$ns\( (id: [0-9]*)\)\?"; then
            ip netns add "$ns" || die "cannot create the network namespace $ns"
        fi
        if ! ip link show "$veth" >/dev/null 2>&1; then
            ip link add "$veth" type veth peer name eth0 netns "$ns"
            ip link set "$veth" master "$BRIDGE"
            ip -n "$ns" addr add "$(node_addr "$i")/24" dev eth0
            say "created node $ns: $(node_addr "$i") on $BRIDGE"
        fi
        ip link set "$veth" up
        ip -n "$ns" link set lo up
        ip -n "$ns" link set eth0 up
    done
fi

# ---------------------------------------------------------------- controller and nodes
if running "$RUN/slurmctld.pid" && [[ $(cat "$RUN/nodes" 2>/dev/null || echo 1) != "$NODES" ]]; then
    die "the running cluster has $(cat "$RUN/nodes" 2>/dev/null || echo 1) node(s), not $NODES:" \
        "stop it first with .ci/slurm-down.sh"
fi
if ((${#CHANGED[@]})) && running "$RUN/slurmctld.pid"; then
    scontrol reconfigure || die "${CHANGED[*]} changed but scontrol reconfigure failed; restart with .ci/slurm-down.sh && .ci/slurm-up.sh"
    say "${CHANGED[*]} changed: reconfigured the running slurmctld (node, port and AuthInfo changes need" \
        ".ci/slurm-down.sh && .ci/slurm-up.sh)"
fi
echo "$NODES" >"$RUN/nodes"
start_daemon slurmctld "$RUN/slurmctld.pid" slurmctld -D
wait_for 30 slurmctld scontrol ping
if ((NODES == 1)); then
    mkdir -p "$SCRATCH/spool/localhost"
    start_daemon slurmd-localhost "$RUN/slurmd-localhost.pid" slurmd -D -N localhost
else
    for ((i = 1; i <= NODES; i++)); do
        node=$(node_name "$i")
        mkdir -p "$SCRATCH/spool/$node"
        # Inside the node's network namespace, with its own host name (slurmd finds its NodeName by
        # it) and its own /etc/hosts. nsenter, unshare and sh all exec: the PID is slurmd's.
        # (Not `ip netns exec`: it remounts /sys, which hides the cgroup file system slurmd wants.)
        start_daemon "slurmd-$node" "$RUN/slurmd-$node.pid" \
            nsenter --net="/run/netns/$node" unshare --uts --mount --propagation private \
            sh -c 'mount --bind "$1" /etc/hosts && hostname "$2" && exec slurmd -D' sh "$ETC/hosts" "$node"
    done
fi

node_idle() { [[ $(sinfo -h -N -n "$1" -o %T) =~ ^(idle|mixed|allocated) ]]; }
for node in $(scontrol show hostnames "$NODE_LIST"); do
    wait_for 30 "node $node" node_idle "$node"
done
say "ready: $(sinfo -h -N -o '%N %T %c CPUs %m MB, partition %P' | paste -sd ';' | sed 's/;/; /g')"
