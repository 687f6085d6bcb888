#!/usr/bin/env bash
# start-cluster.sh - bring up a throw-away, real Slurm cluster (Debian 12 slurm-wlm 22.05)
# on this single machine, from a fresh box, and wait until every node is idle.
# Idempotent: running it again while the cluster is up changes nothing; after a config
# change it restarts the daemons. Must run as root. Stop with stop-cluster.sh.
#
#   SLURM_SANDBOX_MODE=netns (default)  one network+UTS namespace per node (node1=10.200.0.1,
#                                        node2=10.200.0.2, controller slurm-head=10.200.0.254,
#                                        all inside namespaces made here; no address is added
#                                        to the root namespace). Client commands must run in
#                                        the head namespace: put $SLURM_SANDBOX/bin first in
#                                        PATH (wrappers for sbatch, squeue, sacct, ...).
#   SLURM_SANDBOX_MODE=multi            Debian's slurmd is built with --enable-multiple-slurmd:
#                                        N slurmd on 127.0.0.1, ports 17001.., each in its own
#                                        UTS namespace (hostname nodeN). Clients work unwrapped.
#   SLURM_SANDBOX_ACCOUNTING=1           slurmdbd + MariaDB, so plain `sacct` works;
#                           =0 (default) no database; only `sacct -c` (jobcomp/filetxt).
#   SLURM_SANDBOX_NODES=2  SLURM_SANDBOX_CPUS_PER_NODE=4  SLURM_SANDBOX_MEM_PER_NODE=4000
#   SLURM_SANDBOX_GPUS_PER_NODE=0 (>0: fake GPUs, Slurm sets CUDA_VISIBLE_DEVICES; no real device)
set -euo pipefail

SANDBOX=${SLURM_SANDBOX:-${TMPDIR:-/tmp}/slurm-sandbox}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
MODE=${SLURM_SANDBOX_MODE:-netns}
NNODES=${SLURM_SANDBOX_NODES:-2}
CPUS=${SLURM_SANDBOX_CPUS_PER_NODE:-4}
MEM=${SLURM_SANDBOX_MEM_PER_NODE:-4000}
ACCOUNTING=${SLURM_SANDBOX_ACCOUNTING:-0}
WAIT_S=${SLURM_SANDBOX_WAIT_S:-90}
GPUS=${SLURM_SANDBOX_GPUS_PER_NODE:-0}   # >0: fake gres/gpu (/dev/null clones): --gres=gpu:N, --gpus-per-node work
NET=10.200.0                # only ever assigned inside the namespaces created below
HEAD_NS=slurm-head
HEAD_IP=$NET.254

RUN=$SANDBOX/run STATE=$SANDBOX/state LOG=$SANDBOX/log ETC=$SANDBOX/etc BIN=$SANDBOX/bin
DB_NAME=slurm_acct_db
CLIENTS="sbatch srun salloc squeue sinfo scontrol scancel sacct sacctmgr sattach sstat sprio sshare sdiag sreport"

log() { printf '[start-cluster %s +%ss] %s\n' "$(date +%T)" "$SECONDS" "$*"; }
die() { log "ERROR: $*"; for f in "$LOG"/*.log; do [ -f "$f" ] && { echo "--- tail $f"; tail -n 15 "$f"; }; done; exit 1; }
[ "$(id -u)" = 0 ] || die "must run as root"
case $MODE in netns|multi) ;; *) die "SLURM_SANDBOX_MODE must be netns or multi";; esac
if [ "$NNODES" -lt 2 ] || [ "$NNODES" -gt 9 ]; then die "SLURM_SANDBOX_NODES must be 2..9"; fi

# alive PIDFILE COMM: the pid in PIDFILE is running (not a zombie) and is named COMM
alive() {
  local p; [ -s "$1" ] || return 1; p=$(cat "$1" 2>/dev/null) || return 1
  [ -r "/proc/$p/stat" ] || return 1
  [ "$(awk '{print $3}' "/proc/$p/stat" 2>/dev/null)" != Z ] || return 1
  [ -z "${2:-}" ] || [ "$(cat "/proc/$p/comm" 2>/dev/null)" = "$2" ]
}
# run a command in the controller's context (head namespace in netns mode)
head_exec() { if [ "$MODE" = netns ]; then nsenter --net=/run/netns/$HEAD_NS "$@"; else "$@"; fi; }
# run a daemon inside fresh UTS+mount namespaces (own hostname, own /etc/hosts), optionally in a netns
spawn() { # NETNS|- HOSTNAME CMD...
  local ns=$1 host=$2; shift 2
  local pre=(); [ "$ns" = - ] || pre=(nsenter "--net=/run/netns/$ns")
  # shellcheck disable=SC2016  # expanded by the inner sh
  "${pre[@]}" unshare --uts --mount sh -c \
    'mount --bind "$1" /etc/hosts && hostname "$2" && shift 2 && exec "$@"' sh "$ETC/hosts" "$host" "$@"
}
wait_for() { # SECONDS DESCRIPTION CMD...
  local t=$1 what=$2 i; shift 2
  for ((i = 0; i < t * 5; i++)); do "$@" >/dev/null 2>&1 && return 0; sleep 0.2; done
  die "timed out after ${t}s waiting for $what"
}

# ---------------------------------------------------------------- 1. packages
PKGS="munge slurmctld slurmd slurm-client"
[ "$MODE" = netns ] && PKGS="$PKGS iproute2"
[ "$ACCOUNTING" = 1 ] && PKGS="$PKGS slurmdbd mariadb-server"
missing=$(for p in $PKGS; do dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q '^install ok installed' || echo "$p"; done | xargs)
if [ -n "$missing" ]; then
  log "installing: $missing"
  made_policy=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then  # keep apt from starting the daemons itself
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod 755 /usr/sbin/policy-rc.d; made_policy=1
  fi
  apt-get update -qq
  # shellcheck disable=SC2086  # a list of package names
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
  [ $made_policy = 1 ] && rm -f /usr/sbin/policy-rc.d
  log "packages installed"
fi
mkdir -p "$RUN/owned" "$STATE" "$LOG" "$ETC" "$BIN"

# ---------------------------------------------------------------- 2. configuration
H=$(hostname -s)
if [ "$MODE" = netns ]; then
  CTLD_HOST=$HEAD_NS; CTLD_ADDR=$HEAD_IP
else
  CTLD_HOST=$H; CTLD_ADDR=127.0.0.1
fi
{
  echo "127.0.0.1 localhost"
  if [ "$MODE" = netns ]; then
    echo "$HEAD_IP $HEAD_NS"
    for i in $(seq 1 "$NNODES"); do echo "$NET.$i node$i"; done
  else
    echo "127.0.0.1 $H $(for i in $(seq 1 "$NNODES"); do printf 'node%s ' "$i"; done)"
  fi
} > "$ETC/hosts.new"

if [ "$MODE" = netns ]; then
  NODE_LINE="NodeName=node[1-$NNODES] NodeAddr=$NET.[1-$NNODES] CPUs=$CPUS RealMemory=$MEM State=UNKNOWN"
else
  NODE_LINE="NodeName=node[1-$NNODES] NodeHostname=$H NodeAddr=127.0.0.1 Port=[17001-$((17000 + NNODES))] CPUs=$CPUS RealMemory=$MEM State=UNKNOWN"
fi
GRES_LINE=""
if [ "$GPUS" -gt 0 ]; then NODE_LINE="$NODE_LINE Gres=gpu:$GPUS"; GRES_LINE="GresTypes=gpu
AccountingStorageTRES=gres/gpu"; fi
if [ "$ACCOUNTING" = 1 ]; then
  ACCT="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=6819"
else
  ACCT="AccountingStorageType=accounting_storage/none"
fi
cat > "$ETC/slurm.conf.new" <<EOF
# generated by $SANDBOX/start-cluster.sh (mode=$MODE)
ClusterName=ci
SlurmctldHost=$CTLD_HOST($CTLD_ADDR)
AuthType=auth/munge
CredType=cred/munge
# credentials live 10s instead of 120s: a requeued job may restart after ~12s, not ~150s
AuthInfo=cred_expire=10
SlurmUser=root
SlurmdUser=root
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/slurmd-%n
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd-%n.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
MailProg=/bin/true
# no cgroups: track processes through /proc, bind nothing
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/linux
$ACCT
JobCompType=jobcomp/filetxt
JobCompLoc=$STATE/jobcomp.txt
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
# declared CPUs may exceed the real ones (2 cores shared by all nodes)
SlurmdParameters=config_overrides
MpiDefault=none
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=5
MinJobAge=600
Waittime=0
$GRES_LINE
$NODE_LINE
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF

if [ "$GPUS" -gt 0 ]; then
  # gres/gpu drops GPUs without File= and rejects files that are not devices: make /dev/null clones
  mkdir -p "$SANDBOX/fake-gpus"
  for ((g = 0; g < GPUS; g++)); do [ -c "$SANDBOX/fake-gpus/nvidia$g" ] || { rm -f "$SANDBOX/fake-gpus/nvidia$g"; mknod "$SANDBOX/fake-gpus/nvidia$g" c 1 3; }; done
  printf '# generated by start-cluster.sh: fake GPUs (/dev/null clones; nothing can use them)\nAutoDetect=off\nNodeName=node[1-%s] Name=gpu File=%s/fake-gpus/nvidia[0-%s]\n' \
    "$NNODES" "$SANDBOX" "$((GPUS - 1))" > "$ETC/gres.conf.new"
else
  : > "$ETC/gres.conf.new"
fi

cat > "$ETC/slurmdbd.conf.new" <<EOF
# generated by $SANDBOX/start-cluster.sh
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=6819
SlurmUser=root
DebugLevel=info
LogFile=$LOG/slurmdbd.log
PidFile=$RUN/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=root
StorageLoc=$DB_NAME
EOF

any_slurm_alive() {
  alive "$RUN/slurmctld.pid" slurmctld || alive "$RUN/slurmdbd.pid" slurmdbd && return 0
  for f in "$RUN"/slurmd-*.pid; do alive "$f" slurmd && return 0; done; return 1
}
changed=0
cmp -s "$ETC/slurm.conf.new" /etc/slurm/slurm.conf || changed=1
cmp -s "$ETC/hosts.new" "$ETC/hosts" 2>/dev/null || changed=1
cmp -s "$ETC/gres.conf.new" /etc/slurm/gres.conf 2>/dev/null || changed=1
[ "$ACCOUNTING" = 1 ] && { cmp -s "$ETC/slurmdbd.conf.new" /etc/slurm/slurmdbd.conf || changed=1; }
prev_mode=$(cat "$STATE/mode" 2>/dev/null || true)
if [ "$changed" = 1 ] && any_slurm_alive; then
  log "configuration changed: restarting the Slurm daemons"
  if [ -n "$prev_mode" ] && [ "$prev_mode" != "$MODE" ]; then "$HERE/stop-cluster.sh" --purge; else "$HERE/stop-cluster.sh"; fi
  mkdir -p "$RUN/owned" "$STATE" "$LOG" "$ETC" "$BIN"
elif [ -n "$prev_mode" ] && [ "$prev_mode" != "$MODE" ]; then
  rm -rf "$STATE/ctld" "$STATE"/slurmd-*   # node addresses changed: start from a clean state
fi
# no saved controller state => also start with an empty accounting database (job ids restart at 1)
fresh_state=0; [ -n "$(ls -A "$STATE/ctld" 2>/dev/null)" ] || fresh_state=1
mkdir -p /etc/slurm "$STATE/ctld"
mv -f "$ETC/slurm.conf.new" /etc/slurm/slurm.conf
mv -f "$ETC/hosts.new" "$ETC/hosts"
mv -f "$ETC/gres.conf.new" /etc/slurm/gres.conf
if [ "$ACCOUNTING" = 1 ]; then
  install -m 600 "$ETC/slurmdbd.conf.new" /etc/slurm/slurmdbd.conf
fi
rm -f "$ETC/slurmdbd.conf.new"
echo "$MODE" > "$STATE/mode"

# client wrappers. netns mode: inside one of our namespaces (a job on nodeN) run the real command,
# from anywhere else enter the head namespace, and refuse if it is gone (a client run from the root
# namespace would send to $HEAD_IP through the default route). Never rely on /proc/1 (unreadable here).
for c in $CLIENTS; do
  if [ "$MODE" = netns ]; then
    cat > "$BIN/$c" <<EOF
#!/bin/sh
me=\$(stat -L -c %i /proc/self/ns/net)
for ns in /run/netns/$HEAD_NS /run/netns/slurm-node*; do
  [ -e "\$ns" ] && [ "\$(stat -L -c %i "\$ns")" = "\$me" ] && exec /usr/bin/$c "\$@"
done
[ -e /run/netns/$HEAD_NS ] && exec nsenter --net=/run/netns/$HEAD_NS /usr/bin/$c "\$@"
echo "slurm-sandbox: cluster not running (no network namespace $HEAD_NS); run start-cluster.sh" >&2
exit 1
EOF
  else
    printf '#!/bin/sh\nexec /usr/bin/%s "$@"\n' "$c" > "$BIN/$c"
  fi
  chmod 755 "$BIN/$c"
done

# ---------------------------------------------------------------- 3. munge
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  if [ ! -s /etc/munge/munge.key ]; then
    mkdir -p /etc/munge; mungekey --create --keyfile=/etc/munge/munge.key
    chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key
  fi
  install -d -o munge -g munge -m 755 /run/munge
  install -d -o munge -g munge -m 700 /var/log/munge /var/lib/munge
  runuser -u munge -- /usr/sbin/munged
  touch "$RUN/owned/munge"
  wait_for 20 munged sh -c 'munge -n | unmunge'
  log "munged started (pid $(cat /run/munge/munged.pid))"
fi

# ---------------------------------------------------------------- 4. network namespaces
if [ "$MODE" = netns ]; then
  # guard first, before any address exists: the root namespace has no address in $NET.0/24; make
  # sure nothing sent there from the root namespace (a client run without the wrapper) can leave
  # through the default route. No guard, no cluster.
  has_guard() { ip route show type unreachable | awk -v net="$NET.0/24" '$1 == "unreachable" && $2 == net {found = 1} END {exit !found}'; }
  if ! has_guard; then
    ip route add unreachable $NET.0/24 || die "cannot add the guard route 'unreachable $NET.0/24' to the root namespace; not starting"
    touch "$RUN/owned/route"
  fi
  has_guard || die "the guard route 'unreachable $NET.0/24' is not in the root namespace; not starting"
  has_ns() { [ -e "/run/netns/$1" ]; }
  has_ns $HEAD_NS || ip netns add $HEAD_NS || die "cannot create network namespaces here; try SLURM_SANDBOX_MODE=multi"
  ip -n $HEAD_NS link set lo up
  ip -n $HEAD_NS link show br0 >/dev/null 2>&1 || ip -n $HEAD_NS link add br0 type bridge
  ip -n $HEAD_NS addr replace $HEAD_IP/24 dev br0
  ip -n $HEAD_NS link set br0 up
  for i in $(seq 1 "$NNODES"); do
    ns=slurm-node$i
    has_ns "$ns" || ip netns add "$ns"
    if ! ip -n "$ns" link show eth0 >/dev/null 2>&1; then
      ip -n $HEAD_NS link del "vn$i" 2>/dev/null || true
      ip -n $HEAD_NS link add "vn$i" type veth peer name eth0 netns "$ns"
    fi
    ip -n $HEAD_NS link set "vn$i" master br0 up
    ip -n "$ns" link set lo up
    ip -n "$ns" addr replace "$NET.$i/24" dev eth0
    ip -n "$ns" link set eth0 up
  done
  log "network namespaces ready: $(ip netns list | awk '/^slurm-/{print $1}' | xargs)"
fi

# ---------------------------------------------------------------- 5. accounting database
if [ "$ACCOUNTING" = 1 ]; then
  if ! alive "$RUN/mysql/mariadb.pid" mariadbd; then
    install -d -o mysql -g mysql /run/mysqld "$RUN/mysql"
    [ -d /var/lib/mysql/mysql ] || mariadb-install-db --user=mysql --datadir=/var/lib/mysql >/dev/null
    setsid /usr/sbin/mariadbd --user=mysql --datadir=/var/lib/mysql --socket=/run/mysqld/mysqld.sock \
      --pid-file="$RUN/mysql/mariadb.pid" --skip-networking --log-error="$RUN/mysql/mariadb.log" \
      </dev/null >/dev/null 2>&1 &
    touch "$RUN/owned/mariadb"
    wait_for 60 mariadb mysqladmin --socket=/run/mysqld/mysqld.sock ping
    wait_for 10 "mariadb pid file" alive "$RUN/mysql/mariadb.pid" mariadbd
    log "mariadb started (pid $(cat "$RUN/mysql/mariadb.pid"))"
  fi
  if ! alive "$RUN/slurmdbd.pid" slurmdbd; then
    if [ "$fresh_state" = 1 ]; then mysql --socket=/run/mysqld/mysqld.sock -e "DROP DATABASE IF EXISTS $DB_NAME"; fi
    if [ "$MODE" = netns ]; then spawn $HEAD_NS $HEAD_NS slurmdbd; else slurmdbd; fi
    wait_for 30 "slurmdbd port 6819" head_exec bash -c 'echo > /dev/tcp/127.0.0.1/6819'
    log "slurmdbd started (pid $(cat "$RUN/slurmdbd.pid"))"
  fi
  head_exec sacctmgr -i -Q add cluster ci >/dev/null 2>&1 || true
fi

# ---------------------------------------------------------------- 6. slurmctld and slurmd
if ! alive "$RUN/slurmctld.pid" slurmctld; then
  if [ "$MODE" = netns ]; then spawn $HEAD_NS $HEAD_NS slurmctld -i; else slurmctld -i; fi
  wait_for 30 slurmctld sh -c "$BIN/scontrol ping | grep -q UP"
  log "slurmctld started (pid $(cat "$RUN/slurmctld.pid"))"
fi
for i in $(seq 1 "$NNODES"); do
  if ! alive "$RUN/slurmd-node$i.pid" slurmd; then
    mkdir -p "$STATE/slurmd-node$i"
    if [ "$MODE" = netns ]; then spawn "slurm-node$i" "node$i" slurmd -N "node$i"; else spawn - "node$i" slurmd -N "node$i"; fi
    wait_for 20 "slurmd node$i" alive "$RUN/slurmd-node$i.pid" slurmd
    log "slurmd node$i started (pid $(cat "$RUN/slurmd-node$i.pid"))"
  fi
done

# ---------------------------------------------------------------- 7. wait until all nodes are idle
all_idle() { [ "$("$BIN/sinfo" -h -N -o '%N %T' 2>/dev/null | awk '$2=="idle"' | wc -l)" -eq "$NNODES" ]; }
for ((i = 0; i < WAIT_S * 5; i++)); do
  all_idle && break
  # a node left DOWN by an earlier run: resume it once it has registered
  for n in $("$BIN/sinfo" -h -N -o '%N %T' 2>/dev/null | awk '$2 ~ /^(down|drain)/{print $1}'); do
    "$BIN/scontrol" update NodeName="$n" State=RESUME 2>/dev/null || true
  done
  sleep 0.2
done
all_idle || { "$BIN/sinfo" -N -l || true; die "nodes not idle after ${WAIT_S}s"; }
"$BIN/sinfo"
log "cluster up (mode=$MODE, $NNODES nodes, accounting=$ACCOUNTING). Use: export PATH=$BIN:\$PATH"
