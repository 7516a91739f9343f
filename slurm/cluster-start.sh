#!/usr/bin/env bash
# Start a one-node SLURM test cluster whose state, logs, sockets and keys all live in DIR.
#
#   slurm/cluster-start.sh DIR        # then: source DIR/env.sh   (or eval the printed line)
#   slurm/cluster-stop.sh DIR
#
# Needs root (slurmd and munged run as root). Installs the Debian packages slurmctld, slurmd,
# slurm-client and munge with apt-get when they are missing. The node is this host (`hostname -s`,
# reached at 127.0.0.1) declaring CPUS_PER_NODE CPUs (default: at least 4, whatever the hardware has,
# thanks to SlurmdParameters=config_overrides). Ports are picked free at each start.
# Short credential lifetime and scheduling interval make a requeued job start again within seconds.
# Run it again with the cluster up: it only prints the export line. Stdout carries only that line.
set -euo pipefail

die() { echo "cluster-start: $*" >&2; exit 1; }
say() { echo "cluster-start: $*" >&2; }

[ $# -eq 1 ] || die "usage: $0 DIR"
[ "$(id -u)" -eq 0 ] || die "must run as root (slurmd and munged start as root)"
DIR="$(realpath -m "$1")"
# A unix socket path must fit in sockaddr_un (108 bytes).
[ ${#DIR} -le 80 ] || die "directory path too long for the munge socket (${#DIR} > 80 characters): $DIR"
mkdir -p "$DIR"
CONF="$DIR/slurm.conf"
NODE="$(hostname -s)"

alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

install_packages() {
    local missing=()
    for cmd in slurmctld slurmd sbatch munged; do
        command -v "$cmd" >/dev/null || missing+=("$cmd")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    command -v apt-get >/dev/null || die "missing ${missing[*]} and no apt-get to install them"
    say "installing slurmctld slurmd slurm-client munge (missing: ${missing[*]})"
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge \
            >"$DIR/apt.log" 2>&1; then
        apt-get update >>"$DIR/apt.log" 2>&1 || die "apt-get update failed, see $DIR/apt.log"
        apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge \
            >>"$DIR/apt.log" 2>&1 || die "apt-get install failed, see $DIR/apt.log"
    fi
}

free_ports() {  # two distinct free TCP ports on this host
    python3 - <<'EOF'
import socket
socks = [socket.socket() for _ in range(2)]
for s in socks:
    s.bind(("", 0))
print(*(s.getsockname()[1] for s in socks))
EOF
}

write_conf() {
    local ctld_port=$1 slurmd_port=$2 cpus mem_mb
    cpus=${CPUS_PER_NODE:-$(( $(nproc) > 4 ? $(nproc) : 4 ))}
    mem_mb=$(( $(awk '/^MemTotal:/ {print $2}' /proc/meminfo) / 1024 ))
    cat >"$CONF" <<EOF
# Written by slurm/cluster-start.sh: a one-node test cluster, everything under $DIR.
ClusterName=ddptest
SlurmctldHost=$NODE
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire also sets how long a requeued job waits before it may start again (default 120 s).
AuthInfo=socket=$DIR/munge/munge.socket.2,cred_expire=10
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
SwitchType=switch/none
MailProg=/bin/true
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2
SlurmdParameters=config_overrides
JobRequeue=1
ReturnToService=2
KillWait=10
MinJobAge=300
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Default=YES Nodes=ALL MaxTime=INFINITE State=UP
EOF
}

start_munge() {
    alive "$DIR/munge/munged.pid" && return 0
    mkdir -p "$DIR/munge"
    chmod 0755 "$DIR/munge"  # clients of every user must reach the socket
    [ -s "$DIR/munge/munge.key" ] || {
        dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none
        chmod 0400 "$DIR/munge/munge.key"
    }
    munged --socket="$DIR/munge/munge.socket.2" --key-file="$DIR/munge/munge.key" \
        --pid-file="$DIR/munge/munged.pid" --log-file="$DIR/munge/munged.log" \
        --seed-file="$DIR/munge/munged.seed" --force \
        || die "munged failed to start, see $DIR/munge/munged.log"
}

wait_idle() {  # the node must report idle within 30 s
    local state=""
    for _ in $(seq 60); do
        state="$(sinfo -h -N -n "$NODE" -o %t 2>/dev/null || true)"
        [ "$state" = idle ] && return 0
        sleep 0.5
    done
    die "node $NODE not idle after 30 s (state: '${state:-no answer}'); see $DIR/log/"
}

main() {
    export SLURM_CONF="$CONF"
    if alive "$DIR/slurmctld.pid" && alive "$DIR/slurmd.pid" && alive "$DIR/munge/munged.pid"; then
        say "already running in $DIR"
    else
        install_packages
        if alive "$DIR/slurmctld.pid" || alive "$DIR/slurmd.pid"; then
            die "half-running cluster in $DIR; run slurm/cluster-stop.sh $DIR first"
        fi
        mkdir -p "$DIR/state" "$DIR/spool" "$DIR/log"
        read -r ctld_port slurmd_port < <(free_ports)
        write_conf "$ctld_port" "$slurmd_port"
        start_munge
        slurmctld -f "$CONF" || die "slurmctld failed to start, see $DIR/log/slurmctld.log"
        slurmd -f "$CONF" || die "slurmd failed to start, see $DIR/log/slurmd.log"
    fi
    wait_idle
    echo "export SLURM_CONF=$CONF" >"$DIR/env.sh"
    say "node $NODE idle; cluster config $CONF"
    echo "export SLURM_CONF=$CONF"
}

main
