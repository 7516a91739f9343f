#!/usr/bin/env bash
# Stop the test cluster started by slurm/cluster-start.sh DIR: every node's slurmd, slurmctld, then
# munged, each by its PID file in DIR (slurmd-NODE.pid, one per node, whatever --nodes was). Jobs still
# running are cancelled first. Nothing in DIR is deleted (job outputs, logs and the saved state stay for
# inspection), nor the node names cluster-start.sh may have added to /etc/hosts.
set -uo pipefail

[ $# -eq 1 ] || { echo "usage: $0 DIR" >&2; exit 1; }
DIR="$1"
[ -d "$DIR" ] || { echo "cluster-stop: no such directory: $DIR" >&2; exit 1; }

stop() {  # stop NAME PIDFILE: TERM, wait up to 10 s, then KILL
    local name=$1 pidfile=$2 pid
    [ -s "$pidfile" ] || return 0
    pid="$(cat "$pidfile")"
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid"
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        if kill -0 "$pid" 2>/dev/null; then
            echo "cluster-stop: $name ($pid) ignored TERM for 10 s, killing" >&2
            kill -KILL "$pid" 2>/dev/null
        fi
    fi
    rm -f "$pidfile"
}

# Cancel the jobs first: their slurmstepd processes would outlive slurmd.
if [ -s "$DIR/slurmctld.pid" ] && kill -0 "$(cat "$DIR/slurmctld.pid")" 2>/dev/null; then
    export SLURM_CONF="$DIR/slurm.conf"
    jobs="$(squeue -h -o %i 2>/dev/null)"
    if [ -n "$jobs" ]; then
        # shellcheck disable=SC2086
        scancel $jobs 2>/dev/null
        for _ in $(seq 150); do [ -z "$(squeue -h -t R,CG -o %i 2>/dev/null)" ] && break; sleep 0.2; done
    fi
fi

for pidfile in "$DIR"/slurmd*.pid; do  # slurmd-NODE.pid; slurmd.pid from older versions of the script
    [ -e "$pidfile" ] || continue
    name="${pidfile##*/}"
    stop "${name%.pid}" "$pidfile"
done
stop slurmctld "$DIR/slurmctld.pid"
stop munged "$DIR/munge/munged.pid"
echo "cluster-stop: stopped the cluster in $DIR" >&2
