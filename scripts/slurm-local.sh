#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for testing the SLURM profile (tests/test_slurm.py, CI).
#
#   source <(bash scripts/slurm-local.sh start)   # start; prints `export SLURM_CONF=...`
#   bash scripts/slurm-local.sh status
#   bash scripts/slurm-local.sh stop
#
# Needs slurm-wlm and munge installed (.ci/run installs them: apt-get install slurm-wlm munge) and root
# to start the daemons. No systemd or cgroups needed: linuxproc process tracking, no task
# plugin, no accounting database. `sacct` cannot answer without slurmdbd, so status queries go through
# `squeue`, which keeps finished jobs for MinJobAge seconds (the Snakemake SLURM plugin keeps squeue
# when MinJobAge is at least 3x its first status-check delay).
# Settings (environment): SLURM_LOCAL_DIR (state, logs, slurm.conf; default /tmp/slidemil-slurm),
# SLURM_LOCAL_PARTITION (default "local").
set -euo pipefail

DIR=${SLURM_LOCAL_DIR:-/tmp/slidemil-slurm}
PARTITION=${SLURM_LOCAL_PARTITION:-local}
CONF=$DIR/slurm.conf
NODE=$(hostname -s)

log() { echo "slurm-local: $*" >&2; }
die() { log "error: $*"; exit 1; }

# Installing is not this script's job (CI installs the packages in .ci/run; tests install nothing).
MISSING_HINT="install them first, e.g. as root: apt-get update && apt-get install slurm-wlm munge"

require() {
    local tool missing=()
    for tool in slurmctld slurmd munged munge sbatch sinfo squeue scontrol; do
        command -v "$tool" >/dev/null || missing+=("$tool")
    done
    [ ${#missing[@]} = 0 ] || die "not installed: ${missing[*]}; $MISSING_HINT"
    [ "$(id -u)" = 0 ] || die "starting the SLURM and munge daemons needs root"
}

write_conf() {
    local cpus mem
    cpus=$(getconf _NPROCESSORS_ONLN)  # not nproc: it follows OMP_NUM_THREADS
    # Leave the OS some memory; SLURM refuses jobs asking more than RealMemory.
    mem=$(awk '/MemTotal/ {printf "%d", $2 / 1024 * 0.8}' /proc/meminfo)
    mkdir -p "$DIR/ctld" "$DIR/d" "$DIR/log"
    cat >"$CONF" <<CONF
# Written by scripts/slurm-local.sh: one node, no cgroups, no accounting database.
ClusterName=slidemil-local
SlurmctldHost=$NODE
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
# Finished jobs stay visible to squeue this long (the SLURM plugin's status queries need it).
MinJobAge=600
SchedulerParameters=sched_interval=2
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$DIR/ctld
SlurmdSpoolDir=$DIR/d
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
NodeName=$NODE CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=$PARTITION Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
CONF
}

start_munge() {
    if munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
        return 0
    fi
    mkdir -p /run/munge /var/log/munge /var/lib/munge /etc/munge
    if [ ! -s /etc/munge/munge.key ]; then
        if command -v mungekey >/dev/null; then mungekey --create --force; else
            dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null; fi
    fi
    if id munge >/dev/null 2>&1; then
        chown -R munge:munge /run/munge /var/log/munge /var/lib/munge /etc/munge
        chmod 0400 /etc/munge/munge.key
        runuser -u munge -- /usr/sbin/munged
    else
        chmod 0400 /etc/munge/munge.key
        /usr/sbin/munged --force
    fi
    touch "$DIR/munged.started"
    for _ in $(seq 1 20); do
        munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1 && return 0
        sleep 0.5
    done
    die "munged did not start"
}

# Job steps (srun inside a job, as the Snakemake SLURM plugin runs them) drop SLURM_* variables and
# read /etc/slurm/slurm.conf: point it at ours, unless a real configuration is there.
SYSTEM_CONF=/etc/slurm/slurm.conf
link_conf() {
    if [ -e "$SYSTEM_CONF" ] && [ "$(readlink "$SYSTEM_CONF" || true)" != "$CONF" ]; then
        die "$SYSTEM_CONF exists: this machine already has a SLURM configuration; use that cluster instead"
    fi
    mkdir -p "$(dirname "$SYSTEM_CONF")"
    ln -sfn "$CONF" "$SYSTEM_CONF"
}

running() { [ -f "$DIR/$1.pid" ] && kill -0 "$(cat "$DIR/$1.pid")" 2>/dev/null; }

start() {
    require
    mkdir -p "$DIR"
    start_munge
    if ! running slurmctld || ! running slurmd; then
        stop_daemons
        write_conf
        link_conf
        # -c: start clean, without the jobs of an earlier run of this script.
        SLURM_CONF=$CONF slurmctld -c
        SLURM_CONF=$CONF slurmd
    fi
    export SLURM_CONF=$CONF
    local state=""
    for _ in $(seq 1 60); do
        state=$(sinfo -h -N -o "%t" -n "$NODE" 2>/dev/null | head -1 || true)
        case "$state" in
            idle|mix|alloc) echo "export SLURM_CONF=$CONF"; log "node $NODE is $state, partition $PARTITION"; return 0 ;;
            down*|drain*) scontrol update nodename="$NODE" state=resume >/dev/null 2>&1 || true ;;
        esac
        sleep 1
    done
    tail -5 "$DIR/log/slurmctld.log" "$DIR/log/slurmd.log" >&2 || true
    die "node $NODE did not become idle (state: ${state:-unknown}); logs in $DIR/log"
}

stop_daemons() {
    local d
    for d in slurmd slurmctld; do
        if running "$d"; then
            kill "$(cat "$DIR/$d.pid")"
            for _ in $(seq 1 20); do running "$d" || break; sleep 0.5; done
            running "$d" && kill -9 "$(cat "$DIR/$d.pid")" 2>/dev/null || true
        fi
        rm -f "$DIR/$d.pid"
    done
}

stop() {
    stop_daemons
    if [ "$(readlink "$SYSTEM_CONF" || true)" = "$CONF" ]; then rm -f "$SYSTEM_CONF"; fi
    # munged is left running only if this script did not start it; it is harmless either way.
    if [ -f /run/munge/munged.pid ] && [ -f "$DIR/munged.started" ]; then
        kill "$(cat /run/munge/munged.pid)" 2>/dev/null || true
        rm -f "$DIR/munged.started"
    fi
    log "stopped"
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) SLURM_CONF=$CONF sinfo ;;
    conf) echo "$CONF" ;;
    *) echo "usage: $0 start|stop|status|conf" >&2; exit 2 ;;
esac
