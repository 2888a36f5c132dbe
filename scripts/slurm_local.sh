#!/usr/bin/env bash
# A one-node Slurm cluster on this machine, for klsweep's slurm-marked tests and for trying
# the Slurm launcher (docs/how-to/slurm.md): Debian's slurm-wlm (22.05) and munge, run as root,
# every file (config, state, spool, logs, munge key and socket) in one temporary directory.
#
#   scripts/slurm_local.sh start   # prints `export SLURM_CONF=DIR/slurm.conf` on stdout:
#                                  # eval "$(scripts/slurm_local.sh start)"
#   scripts/slurm_local.sh stop    # stops the daemons and removes DIR
#
# Both are idempotent: start on a running cluster prints the same line, stop on none does
# nothing. When the cluster cannot start, start prints one line saying why (on stderr) and
# exits 1. DIR is $KLSWEEP_SLURM_DIR, default ${TMPDIR:-/tmp}/klsweep-slurm; the tests find
# the cluster through $SLURM_CONF, or at that default path.
#
# The node is `localhost` with this machine's cores; one partition, `debug`. Two settings
# differ from a production cluster's defaults, both for tests:
#   cred_expire=5     a requeued job may start again 5 s after it stopped (Slurm's default
#                     holds it pending for 120 s: "how long a requeued job must wait before
#                     starting again", slurm.conf(5))
#   sched_interval=1  the scheduler looks at the queue every second (default 60 s), so a
#                     requeued job starts as soon as it may
set -uo pipefail

dir=${KLSWEEP_SLURM_DIR:-${TMPDIR:-/tmp}/klsweep-slurm}
conf=$dir/slurm.conf
ctld_port=${KLSWEEP_SLURM_PORT:-6817}
slurmd_port=$((ctld_port + 1))

fail() {
    echo "slurm_local: cannot start the cluster: $*" >&2
    exit 1
}

running() {
    [ -f "$conf" ] && SLURM_CONF=$conf timeout 5 sinfo -h -o %t >/dev/null 2>&1
}

stop_cluster() {
    local name pid pids=()
    for name in slurmd slurmctld munged; do
        pid=$(cat "$dir/$name.pid" 2>/dev/null) && [ -n "$pid" ] || continue
        kill "$pid" 2>/dev/null && pids+=("$pid")
    done
    for pid in "${pids[@]}"; do  # all asked at once; each given 5 s before it is killed
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$pid" 2>/dev/null
    done
    rm -rf "$dir"
}

last_line() {  # the last line of a daemon's log that says what went wrong
    grep -E 'error|fatal|Error' "$1" 2>/dev/null | tail -n 1 | sed 's/^\[[^]]*\] //'
}

start_cluster() {
    if running; then
        echo "export SLURM_CONF=$conf"
        return 0
    fi
    [ "$(id -u)" = 0 ] || fail "it must run as root (slurmd starts jobs as their users)"
    for cmd in slurmctld slurmd sinfo munged mungekey; do
        command -v "$cmd" >/dev/null 2>&1 \
            || fail "$cmd is not installed (apt-get install slurm-wlm munge)"
    done
    stop_cluster  # what a dead cluster left behind
    for port in "$ctld_port" "$slurmd_port"; do
        if (echo >"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            fail "port $port is taken (set KLSWEEP_SLURM_PORT to another)"
        fi
    done
    mkdir -p "$dir/state" "$dir/spool" && chmod 700 "$dir" \
        || fail "cannot create $dir"

    mungekey --create --keyfile="$dir/munge.key" 2>/dev/null \
        || fail "mungekey could not create a key in $dir"
    munged --socket="$dir/munge.socket" --key-file="$dir/munge.key" \
        --pid-file="$dir/munged.pid" --log-file="$dir/munged.log" \
        --seed-file="$dir/munged.seed" --force 2>"$dir/munged.err" \
        || fail "munged did not start: $(tail -n 1 "$dir/munged.err")"

    local cpus memory
    cpus=$(nproc)
    memory=$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
    cat >"$conf" <<EOF
ClusterName=klsweep
SlurmctldHost=localhost
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$dir/munge.socket,cred_expire=5
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=1
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
JobRequeue=1
ReturnToService=2
NodeName=localhost CPUs=$cpus RealMemory=$memory State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
    slurmctld -f "$conf" -i 2>"$dir/slurmctld.err" \
        || fail "slurmctld did not start: $(last_line "$dir/slurmctld.log")"
    slurmd -f "$conf" -N localhost 2>"$dir/slurmd.err" \
        || fail "slurmd did not start: $(last_line "$dir/slurmd.log")"
    for _ in $(seq 100); do
        state=$(SLURM_CONF=$conf sinfo -h -o %t 2>/dev/null)
        if [ "$state" = idle ]; then
            echo "export SLURM_CONF=$conf"
            return 0
        fi
        sleep 0.1
    done
    local why
    why=$(last_line "$dir/slurmd.log")
    [ -n "$why" ] || why=$(last_line "$dir/slurmctld.log")
    stop_cluster
    fail "the node did not come up idle in 10 s (state ${state:-unknown}): ${why:-no error logged}"
}

case "${1:-}" in
    start) start_cluster ;;
    stop) stop_cluster ;;
    *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
