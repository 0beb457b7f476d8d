#!/usr/bin/env bash
# Start a single-node SLURM (slurmctld + slurmd + slurmdbd with MariaDB, munge auth) on this
# machine for the `slurm` tests; installs Debian's packages when missing. Idempotent: what is
# already running is left alone. Needs root. Stop it with .ci/slurm-down.sh.
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
mkdir -p "$ETC" "$RUN" "$LOG" "$SCRATCH/state" "$SCRATCH/spool"
CPUS=$(nproc)
MEM_MB=$(($(awk '/^MemTotal:/ {print $2}' /proc/meminfo) * 9 / 10 / 1024))  # below the real size, else slurmd drains the node

CHANGED=()
write_conf "$ETC/slurm.conf" <<EOF
ClusterName=artdist
SlurmctldHost=localhost
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
# A requeued job waits cred_expire+1 s before it may start again (default 120 s): shorter here
# so the preemption tests do not idle.
AuthInfo=cred_expire=20
StateSaveLocation=$SCRATCH/state
SlurmdSpoolDir=$SCRATCH/spool
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd.log
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
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
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
say "config in $ETC (linked from /etc/slurm): node localhost, $CPUS CPUs, $MEM_MB MB"

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

# ---------------------------------------------------------------- controller and node
if ((${#CHANGED[@]})) && running "$RUN/slurmctld.pid"; then
    scontrol reconfigure || die "${CHANGED[*]} changed but scontrol reconfigure failed; restart with .ci/slurm-down.sh && .ci/slurm-up.sh"
    say "${CHANGED[*]} changed: reconfigured the running slurmctld (node, port and AuthInfo changes need" \
        ".ci/slurm-down.sh && .ci/slurm-up.sh)"
fi
start_daemon slurmctld "$RUN/slurmctld.pid" slurmctld -D
wait_for 30 slurmctld scontrol ping
start_daemon slurmd "$RUN/slurmd.pid" slurmd -D -N localhost

node_idle() { [[ $(sinfo -h -N -n localhost -o %T) =~ ^(idle|mixed|allocated) ]]; }
wait_for 30 "node localhost" node_idle
say "ready: $(sinfo -h -N -n localhost -o '%N %T %c CPUs %m MB, partition %P')"
