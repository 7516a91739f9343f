#!/usr/bin/env bash
# Start a SLURM test cluster of N nodes on this host; its state, logs, sockets and keys all live in DIR.
#
#   slurm/cluster-start.sh DIR [--nodes N]   # default 1 node; then: source DIR/env.sh (or eval the printed line)
#   slurm/cluster-stop.sh DIR                # stops every daemon started here, whatever N
#
# Needs root (slurmd and munged run as root). Installs the Debian packages slurmctld, slurmd,
# slurm-client and munge with apt-get when they are missing. Every node is this host, reached at
# 127.0.0.1: one slurmd per node (`slurmd -N NAME`, Slurm's multiple-slurmd support), each with its own
# port, spool directory, PID file and log. Each node declares CPUS_PER_NODE CPUs (default: at least 4,
# whatever the hardware has, thanks to SlurmdParameters=config_overrides). Ports are picked free at
# each start.
#
# Node names must resolve to this host: a job's rendezvous address is its first node's name. They are
# `hostname -s`, then `localhost` (never first: slurmctld would see a duplicated NodeHostName), then
# ddptest-node3, ddptest-node4, ...; a name that does not resolve is appended to /etc/hosts as 127.0.0.1,
# once, on a line marked "ddp_toolkit test cluster" (left there by cluster-stop.sh; harmless).
#
# Short credential lifetime and scheduling interval make a requeued job start again within seconds.
# Run it again with the cluster up: it only prints the export line. Stdout carries only that line.
set -euo pipefail

die() { echo "cluster-start: $*" >&2; exit 1; }
say() { echo "cluster-start: $*" >&2; }
usage() { die "usage: $0 DIR [--nodes N]"; }

NODES=1
DIR_ARG=""
while [ $# -gt 0 ]; do
    case "$1" in
        --nodes) [ $# -ge 2 ] || usage; NODES=$2; shift 2 ;;
        --nodes=*) NODES=${1#--nodes=}; shift ;;
        -*) usage ;;
        *) [ -z "$DIR_ARG" ] || usage; DIR_ARG=$1; shift ;;
    esac
done
[ -n "$DIR_ARG" ] || usage
[[ "$NODES" =~ ^[1-9][0-9]?$ ]] || die "--nodes must be a whole number from 1 to 99, got '$NODES'"
[ "$(id -u)" -eq 0 ] || die "must run as root (slurmd and munged start as root)"
DIR="$(realpath -m "$DIR_ARG")"
# A unix socket path must fit in sockaddr_un (108 bytes).
[ ${#DIR} -le 80 ] || die "directory path too long for the munge socket (${#DIR} > 80 characters): $DIR"
mkdir -p "$DIR"
CONF="$DIR/slurm.conf"
HOST="$(hostname -s)"
HOSTS_MARK="# ddp_toolkit test cluster (slurm/cluster-start.sh)"

alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

node_names() {  # the N node names, one per line
    local names=("$HOST") i=3
    [ "$HOST" = localhost ] || names+=(localhost)
    while [ ${#names[@]} -lt "$NODES" ]; do names+=("ddptest-node$i"); i=$((i + 1)); done
    printf '%s\n' "${names[@]:0:$NODES}"
}

resolve_names() {  # make every node name resolve; append the missing ones to /etc/hosts once
    local name missing=()
    for name in "${NAMES[@]}"; do
        getent hosts "$name" >/dev/null || missing+=("$name")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    [ -w /etc/hosts ] || die "node names ${missing[*]} do not resolve and /etc/hosts is not writable"
    say "adding ${missing[*]} to /etc/hosts (127.0.0.1)"
    # Append in place (no rename): /etc/hosts is often a bind mount in containers.
    echo "127.0.0.1 ${missing[*]} $HOSTS_MARK" >>/etc/hosts
    for name in "${missing[@]}"; do
        getent hosts "$name" >/dev/null || die "node name $name still does not resolve after editing /etc/hosts"
    done
}

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

free_ports() {  # COUNT distinct free TCP ports on this host, on one line
    python3 - "$1" <<'EOF'
import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks:
    s.bind(("", 0))
print(*(s.getsockname()[1] for s in socks))
EOF
}

write_conf() {  # write_conf CTLD_PORT SLURMD_PORT...: one NodeName line per port, in NAMES order
    local ctld_port=$1 cpus mem_mb i
    shift
    cpus=${CPUS_PER_NODE:-$(( $(nproc) > 4 ? $(nproc) : 4 ))}
    mem_mb=$(( $(awk '/^MemTotal:/ {print $2}' /proc/meminfo) / 1024 ))
    {
        cat <<EOF
# Written by slurm/cluster-start.sh: a $NODES-node test cluster on one host, everything under $DIR.
ClusterName=ddptest
SlurmctldHost=$HOST
SlurmctldPort=$ctld_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire also sets how long a requeued job waits before it may start again (default 120 s).
AuthInfo=socket=$DIR/munge/munge.socket.2,cred_expire=10
StateSaveLocation=$DIR/state
# %n is the node name: each slurmd of this host has its own spool, PID file and log.
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
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
EOF
        for i in "${!NAMES[@]}"; do
            echo "NodeName=${NAMES[$i]} NodeAddr=127.0.0.1 NodeHostname=$HOST Port=${1} CPUs=$cpus" \
                 "RealMemory=$mem_mb State=UNKNOWN"
            shift
        done
        echo "PartitionName=debug Default=YES Nodes=ALL MaxTime=INFINITE State=UP"
    } >"$CONF"
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

all_alive() {  # slurmctld, munged and the slurmd of every node
    local name
    alive "$DIR/slurmctld.pid" && alive "$DIR/munge/munged.pid" || return 1
    for name in "${NAMES[@]}"; do alive "$DIR/slurmd-$name.pid" || return 1; done
}

any_slurm_alive() {
    local pidfile
    alive "$DIR/slurmctld.pid" && return 0
    for pidfile in "$DIR"/slurmd*.pid; do alive "$pidfile" && return 0; done
    return 1
}

wait_idle() {  # every node must report idle within 30 s
    local states=""
    for _ in $(seq 60); do
        states="$(sinfo -h -N -o '%N=%t' 2>/dev/null | sort -u | tr '\n' ' ' || true)"
        [ "$(grep -o '=idle' <<<"$states" | wc -l)" -eq "$NODES" ] && return 0
        sleep 0.5
    done
    die "not all $NODES nodes idle after 30 s (states: '${states:-no answer}'); see $DIR/log/"
}

main() {
    export SLURM_CONF="$CONF"
    mapfile -t NAMES < <(node_names)
    if all_alive && [ "$(grep -c '^NodeName=' "$CONF")" -eq "$NODES" ]; then
        say "already running in $DIR"
    else
        any_slurm_alive && die "a cluster (or part of one) is running in $DIR with other settings;" \
            "run slurm/cluster-stop.sh $DIR first"
        install_packages
        resolve_names
        mkdir -p "$DIR/state" "$DIR/log"
        for name in "${NAMES[@]}"; do mkdir -p "$DIR/spool/$name"; done
        read -r -a ports < <(free_ports $((NODES + 1)))
        write_conf "${ports[@]}"
        start_munge
        slurmctld -f "$CONF" || die "slurmctld failed to start, see $DIR/log/slurmctld.log"
        for name in "${NAMES[@]}"; do
            slurmd -f "$CONF" -N "$name" || die "slurmd -N $name failed to start, see $DIR/log/slurmd-$name.log"
        done
    fi
    wait_idle
    echo "export SLURM_CONF=$CONF" >"$DIR/env.sh"
    say "nodes ${NAMES[*]} idle; cluster config $CONF"
    echo "export SLURM_CONF=$CONF"
}

main
