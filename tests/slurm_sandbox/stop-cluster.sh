#!/usr/bin/env bash
# stop-cluster.sh - stop what start-cluster.sh started, each daemon by the PID in its pid file,
# and delete the network namespaces it made. Idempotent.
#   --purge   also forget all Slurm state: controller state, spool dirs, the accounting database,
#             /etc/slurm/slurm.conf, and the guard route (unreachable 10.200.0.0/24) in the root netns
set -uo pipefail

SANDBOX=${SLURM_SANDBOX:-${TMPDIR:-/tmp}/slurm-sandbox}
RUN=$SANDBOX/run STATE=$SANDBOX/state BIN=$SANDBOX/bin
DB_NAME=slurm_acct_db
PURGE=0; [ "${1:-}" = --purge ] && PURGE=1

log() { printf '[stop-cluster %s +%ss] %s\n' "$(date +%T)" "$SECONDS" "$*"; }
[ "$(id -u)" = 0 ] || { log "must run as root"; exit 1; }

alive() {
  local p; [ -s "$1" ] || return 1; p=$(cat "$1" 2>/dev/null) || return 1
  [ -r "/proc/$p/stat" ] || return 1
  [ "$(awk '{print $3}' "/proc/$p/stat" 2>/dev/null)" != Z ] || return 1
  [ -z "${2:-}" ] || [ "$(cat "/proc/$p/comm" 2>/dev/null)" = "$2" ]
}
# stop_pid PIDFILE COMM: SIGTERM, wait up to 15 s, then SIGKILL; only if the pid still names COMM
stop_pid() {
  local f=$1 comm=$2 p i
  if alive "$f" "$comm"; then
    p=$(cat "$f"); kill -TERM "$p" 2>/dev/null
    for ((i = 0; i < 150; i++)); do alive "$f" "$comm" || break; sleep 0.1; done
    if alive "$f" "$comm"; then log "$comm ($p) ignored SIGTERM, sending SIGKILL"; kill -KILL "$p" 2>/dev/null; sleep 0.2; fi
    log "stopped $comm (pid $p)"
  fi
  rm -f "$f"
}

# 1. cancel remaining jobs so that no job step outlives its slurmd
if alive "$RUN/slurmctld.pid" slurmctld && [ -x "$BIN/squeue" ]; then
  jobs=$("$BIN/squeue" -h -o %A 2>/dev/null | xargs)
  if [ -n "$jobs" ]; then
    log "cancelling jobs: $jobs"
    # shellcheck disable=SC2086  # a list of job ids
    "$BIN/scancel" $jobs 2>/dev/null
    for ((i = 0; i < 100; i++)); do [ -z "$("$BIN/squeue" -h -o %A 2>/dev/null)" ] && break; sleep 0.2; done
  fi
fi
# 2. Slurm daemons, compute nodes first
for f in "$RUN"/slurmd-*.pid; do [ -e "$f" ] && stop_pid "$f" slurmd; done
stop_pid "$RUN/slurmctld.pid" slurmctld
stop_pid "$RUN/slurmdbd.pid" slurmdbd

# 3. leftovers (job processes) inside the namespaces made by start-cluster.sh, by PID
for ns in $(ip netns list 2>/dev/null | awk '/^slurm-(head|node[0-9]+)( |$)/{print $1}'); do
  for p in $(ip netns pids "$ns" 2>/dev/null); do
    log "killing leftover pid $p ($(cat "/proc/$p/comm" 2>/dev/null)) in netns $ns"; kill -KILL "$p" 2>/dev/null
  done
  ip netns del "$ns" && log "deleted netns $ns"
done

# 4. accounting database: drop it on --purge, stop mariadb if we started it
if [ "$PURGE" = 1 ] && alive "$RUN/mysql/mariadb.pid" mariadbd; then
  mysql --socket=/run/mysqld/mysqld.sock -e "DROP DATABASE IF EXISTS $DB_NAME" && log "dropped database $DB_NAME"
fi
if [ -e "$RUN/owned/mariadb" ]; then stop_pid "$RUN/mysql/mariadb.pid" mariadbd; rm -f "$RUN/owned/mariadb"; fi

# 5. munged, if we started it
if [ -e "$RUN/owned/munge" ]; then stop_pid /run/munge/munged.pid munged; rm -f "$RUN/owned/munge"; fi

if [ "$PURGE" = 1 ]; then
  rm -rf "$STATE/ctld" "$STATE"/slurmd-* "$STATE/jobcomp.txt" "$STATE/mode" "$SANDBOX/fake-gpus"
  # no slurm.conf left that points at 10.200.0.254, so the guard route can go too
  rm -f /etc/slurm/slurm.conf /etc/slurm/slurmdbd.conf /etc/slurm/gres.conf
  if [ -e "$RUN/owned/route" ]; then
    ip route del unreachable 10.200.0.0/24 2>/dev/null && log "removed guard route unreachable 10.200.0.0/24"
    rm -f "$RUN/owned/route"
  fi
  log "purged Slurm state and configuration"
fi
log "done"
