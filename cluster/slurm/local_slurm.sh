#!/usr/bin/env bash
# A one-host Slurm cluster for Kiln's integration tests and for trying `kiln submit --scheduler
# slurm` locally. Needs root and Debian's `slurm-wlm` + `munge` (`.ci/run` installs them:
# `apt-get install -y slurm-wlm munge`). No systemd is assumed: the daemons are started directly.
#
#   cluster/slurm/local_slurm.sh start    # munged, slurmctld, slurmd; waits for the node to be idle
#   cluster/slurm/local_slurm.sh status   # sinfo + squeue
#   cluster/slurm/local_slurm.sh stop     # cancels jobs, stops the daemons, deletes job state
#
# `start` is idempotent: a second `start` finds the running daemons and only waits for the node.
#
# Layout. The configuration is written to /etc/slurm/slurm.conf (the path every Slurm command reads
# by default, so no SLURM_CONF is needed); `start` refuses to overwrite a slurm.conf it did not
# write, and `stop` removes it again. State, spool, pid and log files live under
# $KILN_SLURM_ROOT (default /tmp/kiln-slurm): state/ (slurmctld), spool/ (slurmd), run/ (pid
# files), log/ (slurmctld.log, slurmd-NODE.log, jobcomp.txt). munged uses its Debian defaults (key
# /etc/munge/munge.key, socket /run/munge/munge.socket.2); a munged that is already running is
# reused and left alone by `stop`.
#
# The cluster: one node named `hostname -s` with the CPU count and memory `slurmd -C` reports,
# one partition `debug` (default, no time limit), SlurmUser=root, cons_tres with CR_CPU (a job
# gets whole CPUs; memory is not a consumable), no cgroups (proctrack/linuxproc, task/none).
#
# KILN_SLURM_NODES=N (N>1) instead runs N slurmd daemons on this host: nodes kiln-node[1-N], one
# port each (6818, 6819, ...), each with all of the host's CPUs and memory (so the host is
# oversubscribed N times). Their names are added to /etc/hosts as 127.0.0.1 (`stop` removes
# them) so that a job's head node name resolves, e.g. as torchrun's MASTER_ADDR. Debian's Slurm
# is built with multiple-slurmd support, so this needs no network namespaces. Unset, it means
# the node count of the running cluster, or 1.
#
# Timing is tuned for tests: the scheduler runs every second, a requeued job may start again
# 5 s after it left its node (AuthInfo=cred_expire=5; the default is 120 s), KillWait=30.
#
# Job state without slurmdbd (AccountingStorageType=accounting_storage/none):
#   * squeue shows pending and running jobs (and, for a moment, completing ones).
#   * `scontrol show job -o JOBID` shows any job until MinJobAge=600 s after it ended: JobState=
#     COMPLETED / FAILED / CANCELLED / TIMEOUT / NODE_FAIL ..., ExitCode=rc:signal, Restarts=N
#     (the requeue count). After that: "slurm_load_jobs error: Invalid job id specified".
#   * plain `sacct` does NOT work: it prints "Slurm accounting storage is disabled", exit 1.
#   * `sacct -c` (--completion) DOES work: it reads the job completion log that
#     JobCompType=jobcomp/filetxt writes to $KILN_SLURM_ROOT/log/jobcomp.txt, one line per job
#     end, e.g. `sacct -c -j JOBID --parsable2 --noheader -o JobID,State,ExitCode`. A requeued
#     job has one line per run (a run ended by the requeue says PENDING; the last line is the
#     latest). Its ExitCode loses the signal (TIMEOUT: 0:0 there, 0:9 in scontrol); fields that
#     need accounting (AveRSS, TotalCPU, ...) are empty. `stop` deletes the file, since job ids
#     start again from 1 after it.
#
# Signals before the time limit (`--signal=[B:]SIG@N`): slurmctld looks at time limits and these
# signals only every 30 s (a fixed period inside slurmctld), so the signal comes up to 30 s
# late, between N and N-30 s before the limit, and the job is killed (TIMEOUT) between 0 and 30 s
# after its limit. With --time=1 --signal=B:USR1@50 the batch shell gets USR1 10-40 s after the
# start (28 s when this was written) and is killed 60-90 s after it. Without `B:` only the job
# steps (srun) get the signal, not the batch shell; with `B:` only the batch shell.
set -euo pipefail
export PATH="$PATH:/usr/sbin:/sbin"  # slurmd, slurmctld, munged

ROOT="${KILN_SLURM_ROOT:-/tmp/kiln-slurm}"
START_TIMEOUT_S="${KILN_SLURM_START_TIMEOUT:-60}"
CONF_DIR=/etc/slurm
CONF="$CONF_DIR/slurm.conf"
MARKER="# Written by Kiln's cluster/slurm/local_slurm.sh"
HOSTS_MARKER="# kiln local_slurm.sh"
MUNGE_KEY=/etc/munge/munge.key
MUNGE_PID=/run/munge/munged.pid
HOST="$(hostname -s)"

die() { echo "local_slurm: error: $*" >&2; exit 1; }
say() { echo "local_slurm: $*"; }

pid_alive() {  # pid_alive PIDFILE: true if the file names a live process
    local pid
    [[ -s "$1" ]] || return 1
    pid="$(cat "$1" 2>/dev/null)" || return 1
    [[ "$pid" =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null
}

# Unset KILN_SLURM_NODES means: as many nodes as the running cluster has, else 1.
if [[ -n "${KILN_SLURM_NODES:-}" ]]; then
    NODES="$KILN_SLURM_NODES"
elif pid_alive "$ROOT/run/slurmctld.pid" && [[ -s "$ROOT/run/nodes" ]]; then
    NODES="$(cat "$ROOT/run/nodes")"
else
    NODES=1
fi

[[ "$NODES" =~ ^[1-9][0-9]*$ ]] || die "KILN_SLURM_NODES must be a positive integer, not '$NODES'"
if ((NODES == 1)); then
    NODE_NAMES=("$HOST")
else
    NODE_NAMES=()
    for ((i = 1; i <= NODES; i++)); do NODE_NAMES+=("kiln-node$i"); done
fi

stop_pidfile() {  # stop_pidfile NAME PIDFILE: SIGTERM, wait up to 15 s, then SIGKILL
    local name="$1" file="$2" pid i
    if ! pid_alive "$file"; then
        rm -f "$file"
        return 0
    fi
    pid="$(cat "$file")"
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 150; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        say "$name (pid $pid) ignored SIGTERM for 15 s; sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
        sleep 0.5
    fi
    rm -f "$file"
    say "stopped $name (pid $pid)"
}

wait_for() {  # wait_for COMMAND SECONDS: poll COMMAND every 0.2 s
    local cmd="$1" i
    for ((i = 0; i < $2 * 5; i++)); do
        "$cmd" && return 0
        sleep 0.2
    done
    return 1
}

require_tools() {
    local missing=() t
    for t in munged mungekey munge unmunge runuser flock slurmctld slurmd sinfo squeue scontrol \
        scancel sbatch; do
        command -v "$t" >/dev/null 2>&1 || missing+=("$t")
    done
    ((${#missing[@]} == 0)) || die "missing ${missing[*]}: install them with" \
        "'DEBIAN_FRONTEND=noninteractive apt-get install -y slurm-wlm munge' (.ci/run does this)"
    ((EUID == 0)) || die "must run as root (it writes $CONF and starts the Slurm daemons)"
}

munge_works() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

start_munge() {
    if munge_works; then
        return 0
    fi
    install -d -o munge -g munge -m 0700 /etc/munge /var/log/munge
    install -d -o munge -g munge -m 0711 /var/lib/munge
    install -d -o munge -g munge -m 0755 /run/munge
    if [[ ! -s "$MUNGE_KEY" ]]; then
        say "creating $MUNGE_KEY"
        mungekey --create --keyfile="$MUNGE_KEY"
    fi
    chown munge:munge "$MUNGE_KEY"
    chmod 0400 "$MUNGE_KEY"
    rm -f "$MUNGE_PID"
    # As the munge user, as systemd would; as root with --force if that fails.
    # (9>&-: the daemons must not inherit the lock on $ROOT/.local_slurm.lock.)
    if ! runuser -u munge -- munged >/dev/null 2>&1 9>&- || ! wait_for munge_works 5; then
        say "munged did not start as user munge; starting it as root with --force"
        munged --force >/dev/null 2>&1 9>&- || true
        wait_for munge_works 5 || die "munged does not answer (see /var/log/munge/munged.log)"
    fi
    touch "$ROOT/run/munged.ours"
    say "started munged (pid $(cat "$MUNGE_PID" 2>/dev/null || echo '?'))"
}

write_hosts() {  # with several nodes: their names resolve to 127.0.0.1
    local kept
    kept="$(grep -vF "$HOSTS_MARKER" /etc/hosts || true)"
    if ((NODES > 1)); then
        printf '%s\n127.0.0.1 %s %s\n' "$kept" "${NODE_NAMES[*]}" "$HOSTS_MARKER" >/etc/hosts
    elif grep -qF "$HOSTS_MARKER" /etc/hosts; then
        printf '%s\n' "$kept" >/etc/hosts
    fi
}

write_conf() {
    local hw tmp i node_lines=""
    if [[ -e "$CONF" ]] && ! grep -qF "$MARKER" "$CONF"; then
        die "$CONF exists and was not written by this script; move it away to use the local cluster"
    fi
    hw="$(slurmd -C | head -n 1)"
    [[ "$hw" == NodeName=*" CPUs="* ]] || die "slurmd -C printed no node line: $hw"
    hw="${hw#NodeName=* }"  # CPUs=... RealMemory=..., without the name
    if ((NODES == 1)); then
        node_lines="NodeName=$HOST $hw State=UNKNOWN"
    else
        for ((i = 0; i < NODES; i++)); do
            node_lines+="NodeName=${NODE_NAMES[i]} NodeHostname=$HOST NodeAddr=127.0.0.1"
            node_lines+=" Port=$((6818 + i)) $hw State=UNKNOWN"$'\n'
        done
    fi
    install -d -m 0755 "$CONF_DIR"
    tmp="$(mktemp "$CONF_DIR/.slurm.conf.XXXXXX")"
    cat >"$tmp" <<EOF
$MARKER (start rewrites it, stop removes it).
# State, spool, pid and log files: $ROOT
ClusterName=kiln-local
SlurmctldHost=$HOST
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# A requeued job waits cred_expire seconds before it may start again (default 120 s).
AuthInfo=cred_expire=5
MpiDefault=none
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1,bf_interval=1
StateSaveLocation=$ROOT/state
SlurmdSpoolDir=$ROOT/spool/%n
SlurmctldPidFile=$ROOT/run/slurmctld.pid
SlurmdPidFile=$ROOT/run/slurmd-%n.pid
SlurmctldLogFile=$ROOT/log/slurmctld.log
SlurmdLogFile=$ROOT/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
# No slurmdbd: plain sacct does not work, \`sacct -c\` reads JobCompLoc; finished jobs stay in
# \`scontrol show job\` for MinJobAge seconds.
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc=$ROOT/log/jobcomp.txt
MinJobAge=600
ReturnToService=2
JobRequeue=1
KillWait=30
PreemptMode=OFF
SlurmctldTimeout=30
SlurmdTimeout=30
MessageTimeout=5
TCPTimeout=2
InactiveLimit=0
Waittime=0
$node_lines
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
    chmod 0644 "$tmp"
    mv -f "$tmp" "$CONF"
}

nodes_ready() {  # every node idle/mixed/allocated; prints a summary into $NODE_SUMMARY
    local out name state ready=0
    out="$(sinfo -h -N -o '%N %T' 2>/dev/null)" || { NODE_SUMMARY="sinfo failed"; return 1; }
    NODE_SUMMARY="${out//$'\n'/, }"
    while read -r name state; do
        case "$state" in
            idle | mixed | allocated | completing) ready=$((ready + 1)) ;;
        esac
    done <<<"$out"
    ((ready == NODES))
}

lock() {  # one start/stop at a time (e.g. several pytest-xdist workers starting the cluster)
    install -d -m 0755 "$ROOT"
    exec 9>"$ROOT/.local_slurm.lock"
    flock -w 120 9 || die "another local_slurm.sh holds $ROOT/.local_slurm.lock"
}

start() {
    require_tools
    lock
    install -d -m 0755 "$ROOT/state" "$ROOT/spool" "$ROOT/run" "$ROOT/log"
    if [[ -s "$ROOT/run/nodes" && "$(cat "$ROOT/run/nodes")" != "$NODES" ]] \
        && pid_alive "$ROOT/run/slurmctld.pid"; then
        die "the cluster runs $(cat "$ROOT/run/nodes") node(s), not $NODES; stop it first"
    fi
    start_munge
    local ctld_pid="$ROOT/run/slurmctld.pid" all_up=1 n
    pid_alive "$ctld_pid" || all_up=0
    for n in "${NODE_NAMES[@]}"; do pid_alive "$ROOT/run/slurmd-$n.pid" || all_up=0; done
    if ((all_up)); then
        say "already running (slurmctld pid $(cat "$ctld_pid"))"
    else
        write_conf
        write_hosts
        echo "$NODES" >"$ROOT/run/nodes"
        if ! pid_alive "$ctld_pid"; then
            slurmctld 9>&- || die "slurmctld failed to start; see $ROOT/log/slurmctld.log"
            say "started slurmctld"
        fi
        for n in "${NODE_NAMES[@]}"; do
            pid_alive "$ROOT/run/slurmd-$n.pid" && continue
            install -d -m 0755 "$ROOT/spool/$n"
            slurmd -N "$n" 9>&- || die "slurmd failed to start; see $ROOT/log/slurmd-$n.log"
            say "started slurmd (node $n)"
        done
    fi
    local i f
    NODE_SUMMARY=""
    for ((i = 1; i <= START_TIMEOUT_S * 2; i++)); do
        nodes_ready && break
        if ((i % 10 == 0)); then  # e.g. left down or drained by an earlier run: ask for it back
            scontrol update NodeName="$(IFS=,; echo "${NODE_NAMES[*]}")" State=RESUME \
                >/dev/null 2>&1 || true
        fi
        sleep 0.5
    done
    if ! nodes_ready; then
        {
            echo "--- sinfo -R:"
            sinfo -R || true
            for f in slurmctld.log "${NODE_NAMES[@]/#/slurmd-}"; do
                f="${f%.log}.log"
                echo "--- tail $ROOT/log/$f:"
                tail -n 15 "$ROOT/log/$f" || true
            done
        } >&2
        die "nodes not idle after ${START_TIMEOUT_S} s: ${NODE_SUMMARY:-none reported}"
    fi
    say "cluster up: $NODE_SUMMARY; config $CONF; logs $ROOT/log"
}

stop() {
    ((EUID == 0)) || die "must run as root"
    lock
    local ctld_pid="$ROOT/run/slurmctld.pid" jobs i f
    if pid_alive "$ctld_pid"; then
        jobs="$(squeue -h -o %i 2>/dev/null || true)"
        if [[ -n "$jobs" ]]; then
            say "cancelling jobs: ${jobs//$'\n'/ }"
            # shellcheck disable=SC2086
            scancel $jobs 2>/dev/null || true
            for ((i = 0; i < 70; i++)); do  # KillWait=30: a job ignoring SIGTERM takes 30 s
                [[ -z "$(squeue -h -o %i 2>/dev/null)" ]] && break
                sleep 0.5
            done
        fi
    fi
    for f in "$ROOT"/run/slurmd-*.pid; do
        [[ -e "$f" ]] && stop_pidfile "slurmd $(basename "$f" .pid | cut -d- -f2-)" "$f"
    done
    stop_pidfile slurmctld "$ctld_pid"
    if [[ -e "$ROOT/run/munged.ours" ]]; then
        stop_pidfile munged "$MUNGE_PID"
    fi
    rm -rf "$ROOT/state" "$ROOT/spool" "$ROOT/run" "$ROOT/log/jobcomp.txt"
    if [[ -e "$CONF" ]] && grep -qF "$MARKER" "$CONF"; then
        rm -f "$CONF"
    fi
    NODES=1 write_hosts
    say "stopped; job state and jobcomp.txt removed (daemon logs kept in $ROOT/log)"
}

status() {
    if ! pid_alive "$ROOT/run/slurmctld.pid"; then
        echo "local_slurm: not running (no live slurmctld pid in $ROOT/run/slurmctld.pid)"
        return 3
    fi
    sinfo
    echo
    squeue
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *)
        echo "usage: $0 start|stop|status" >&2
        echo "  env: KILN_SLURM_ROOT (default /tmp/kiln-slurm), KILN_SLURM_NODES (default 1)" >&2
        exit 2
        ;;
esac
