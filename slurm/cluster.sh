#!/usr/bin/env bash
# Single-node SLURM cluster (slurmctld + slurmd + slurmdbd on MariaDB, munge
# auth, two fake GPUs) on this host, for cifarbench development and CI.
#
#   bash slurm/cluster.sh up            install if needed, start, wait until usable
#   bash slurm/cluster.sh status        daemon states + sinfo; non-zero if unusable
#   bash slurm/cluster.sh down [--purge] cancel jobs, stop every daemon
#                                       (--purge: also wipe job state + accounting DB)
#
# Needs root on Debian bookworm (SLURM 22.05). There is no systemd on the
# machines this runs on, so every daemon is started directly.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CLUSTER=${CLUSTER_NAME:-cifarbench}
HOST=$(hostname -s)             # slurm.conf's NodeName must equal `hostname -s`
TIMEOUT=${CLUSTER_TIMEOUT:-90}  # seconds to wait for each readiness check
DB=slurm_acct_db DBUSER=slurm DBPASS=${SLURMDBD_PASS:-slurmdbd}  # MariaDB only listens on localhost
RUN=/run/slurm LOG=/var/log/slurm STATE=/var/lib/slurm
PACKAGES=(slurm-wlm slurmdbd munge mariadb-server)

log() { echo "[cluster] $*" >&2; }
die() { log "ERROR: $*"; exit 1; }
# pid_of NAME: oldest live process with that exact name. Zombies are skipped:
# a killed daemon stays a zombie until PID 1 gets round to reaping it.
pid_of() { ps -C "$1" -o pid=,stat= 2>/dev/null | awk '$2 !~ /^Z/ {print $1; exit}'; }
running() { [ -n "$(pid_of "$1")" ]; }
# start_daemon NAME: slurm daemons fork into the background themselves; detach
# their stdio so a caller capturing our output never waits on them.
start_daemon() { running "$1" || "$1" </dev/null >>"$LOG/$1.out" 2>&1; }

# wait_for SECONDS WHAT CMD...: poll CMD once a second until it succeeds.
wait_for() {
  local t=$1 what=$2 i; shift 2
  for ((i = 0; i < t; i++)); do "$@" >/dev/null 2>&1 && return 0; sleep 1; done
  die "timed out after ${t}s waiting for $what (logs: $LOG)"
}

# stop NAME PIDFILE: SIGTERM through the pid file, SIGTERM by exact process
# name after 5 s (stale/missing pid file), SIGKILL after 20 s.
stop() {
  local name=$1 pidfile=$2 i
  if running "$name"; then
    log "stopping $name"
    [ -f "$pidfile" ] && { kill "$(cat "$pidfile")" 2>/dev/null || true; }
    for ((i = 0; i < 100; i++)); do  # 100 x 0.2 s
      running "$name" || break
      [ "$i" -eq 25 ] && { pkill -x "$name" || true; }
      sleep 0.2
    done
    pkill -9 -x "$name" 2>/dev/null || true
  fi
  rm -f "$pidfile"
}

install_packages() {
  local p missing=0
  for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing=1
  done
  [ "$missing" -eq 0 ] && return 0
  log "installing ${PACKAGES[*]}"
  # Forbid maintainer scripts from starting services (policy-rc.d exit 101):
  # the init scripts would start MariaDB behind our back and slurm's daemons
  # would fail for lack of a config. We start everything ourselves.
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
    chmod +x /usr/sbin/policy-rc.d
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq  # CI machines start with empty package lists
  apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" >/dev/null
}

# render TEMPLATE DEST MODE: fill @VARS@ in, install if different (sets CHANGED).
render() {
  local tmp; tmp=$(mktemp)
  sed -e "s/@HOST@/$HOST/g; s/@CLUSTER@/$CLUSTER/g; s/@CPUS@/$CPUS/g" \
      -e "s/@MEMORY@/$MEMORY/g; s/@DEFMEM@/$DEFMEM/g; s/@DB@/$DB/g" \
      -e "s/@DBUSER@/$DBUSER/g; s/@DBPASS@/$DBPASS/g" "$1" >"$tmp"
  if cmp -s "$tmp" "$2"; then rm -f "$tmp"; return 0; fi
  install -D -m "$3" "$tmp" "$2" && rm -f "$tmp" && CHANGED=1
}

start_munge() {
  # munged refuses to run as root and insists on a private key owned by munge.
  install -d -o munge -g munge -m 0700 /etc/munge /var/lib/munge /var/log/munge
  install -d -o munge -g munge -m 0755 /run/munge
  if [ ! -s /etc/munge/munge.key ]; then
    log "creating munge key"
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
  fi
  chown munge:munge /etc/munge/munge.key && chmod 0400 /etc/munge/munge.key
  running munged || runuser -u munge -- /usr/sbin/munged </dev/null >/dev/null 2>&1
  wait_for "$TIMEOUT" munged sh -c 'munge -n | unmunge'
}

start_mariadb() {
  install -m 0644 "$HERE/mariadb.cnf" /etc/mysql/mariadb.conf.d/90-cifarbench-slurm.cnf
  install -d -o mysql -g mysql -m 0755 /run/mysqld
  [ -d /var/lib/mysql/mysql ] || mariadb-install-db --user=mysql >/dev/null
  if ! running mariadbd; then
    # mariadbd does not daemonize: detach it and keep its output in a log.
    setsid /usr/sbin/mariadbd --user=mysql </dev/null >>"$LOG/mariadb.log" 2>&1 &
  fi
  wait_for "$TIMEOUT" MariaDB mariadb-admin ping  # root logs in over the unix socket
}

setup_database() {
  mariadb <<SQL
CREATE DATABASE IF NOT EXISTS $DB;
CREATE USER IF NOT EXISTS '$DBUSER'@'localhost' IDENTIFIED BY '$DBPASS';
ALTER USER '$DBUSER'@'localhost' IDENTIFIED BY '$DBPASS';
GRANT ALL ON $DB.* TO '$DBUSER'@'localhost';
SQL
}

node_state() { sinfo -h -N -n "$HOST" -o %T 2>/dev/null | head -1; }

# Node usable: idle/mixed/allocated (no '*' = responding). A node left DOWN or
# DRAINED by an earlier run (killed slurmd, bad config) is resumed here.
node_ready() {
  case $(node_state) in
    idle | mixed | allocated | completing) return 0 ;;
    down* | drain* | fail*) scontrol update nodename="$HOST" state=resume >/dev/null 2>&1 || true ;;
  esac
  return 1
}

up() {
  local t0=$SECONDS
  [ "$(id -u)" -eq 0 ] || die "must run as root"
  install_packages
  install -d "$RUN" "$LOG" "$STATE/slurmctld" "$STATE/slurmd" /etc/slurm
  # gres.conf needs one device file per fake GPU. slurmd only logs an error for
  # a plain file, so make them character devices aliasing /dev/null (1,3).
  local i
  for i in 0 1; do
    [ -c /dev/fakegpu$i ] || { rm -f /dev/fakegpu$i; mknod -m 0666 /dev/fakegpu$i c 1 3 || touch /dev/fakegpu$i; }
  done

  CPUS=$(nproc)
  local total; total=$(awk '/^MemTotal/ {print int($2 / 1024)}' /proc/meminfo)
  # Leave headroom below the real total: slurmd drains a node whose memory is
  # below RealMemory, and the kernel reports slightly less than installed.
  MEMORY=$((total > 8192 ? total - 4096 : total / 2))
  # A job without --mem gets DefMemPerCPU per CPU and is killed above it
  # (OverMemoryKill in slurm.conf): 4 GB covers a CPU-only resnet20 test job
  # (1.1-1.6 GB RSS) with room to spare; less only where the node has less.
  DEFMEM=$((MEMORY < 4096 ? MEMORY : 4096))
  CHANGED=0
  render "$HERE/slurm.conf.in" /etc/slurm/slurm.conf 0644
  render "$HERE/gres.conf" /etc/slurm/gres.conf 0644
  render "$HERE/slurmdbd.conf.in" /etc/slurm/slurmdbd.conf 0600
  if [ "$CHANGED" -eq 1 ] && running slurmctld; then
    log "configuration changed: restarting slurm daemons"
    stop slurmd "$RUN/slurmd.pid"; stop slurmctld "$RUN/slurmctld.pid"; stop slurmdbd "$RUN/slurmdbd.pid"
  fi

  start_munge
  start_mariadb
  setup_database
  start_daemon slurmdbd
  wait_for "$TIMEOUT" slurmdbd sacctmgr -n list cluster
  # Registering the cluster also creates the root account and root's
  # association, which is all root needs to submit (no AccountingStorageEnforce).
  sacctmgr -n -P list cluster format=cluster | grep -qx "$CLUSTER" ||
    sacctmgr -i add cluster "$CLUSTER" >/dev/null
  start_daemon slurmctld
  wait_for "$TIMEOUT" slurmctld scontrol ping
  start_daemon slurmd
  wait_for "$TIMEOUT" "node $HOST to become idle" node_ready
  wait_for "$TIMEOUT" sacct sacct -n -X
  # A QOS with per-user limits for cifarbench's preflight to meet (README); root may use it and keeps normal as its
  # default. Set once slurmctld has registered the gres/gpu TRES with slurmdbd; modify repeats harmlessly, add fails
  # where the QOS exists.
  sacctmgr -n -P list qos format=name | grep -qx capped || sacctmgr -i add qos capped >/dev/null
  sacctmgr -i modify qos capped set MaxSubmitJobsPerUser=3 MaxJobsPerUser=1 MaxWall=00:20:00 \
    MaxTRESPerUser=gres/gpu=1 >/dev/null
  sacctmgr -i modify user root set qos+=capped >/dev/null
  echo "slurm cluster '$CLUSTER' up in $((SECONDS - t0))s: node $HOST $(node_state)," \
    "cpus=$CPUS mem=${MEMORY}M gres=gpu:a100:2 features=ib,localdisk, partitions debug (default), short (30 min) and spare (DOWN nodes only)," \
    "accounting via slurmdbd"
}

status() {
  local d p bad=0
  for d in munged mariadbd slurmdbd slurmctld slurmd; do
    if p=$(pid_of "$d") && [ -n "$p" ]; then printf '%-10s running (pid %s)\n' "$d" "$p"
    else printf '%-10s stopped\n' "$d"; bad=1; fi
  done
  [ "$bad" -eq 0 ] || { echo "cluster NOT usable: daemon(s) stopped"; return 1; }
  sinfo -N -o '%N %P %T %c %m %G' || bad=1
  case $(node_state) in idle | mixed | allocated | completing) ;; *) echo "node $HOST not usable"; bad=1 ;; esac
  sacct -n -X >/dev/null 2>&1 || { echo "sacct failed (slurmdbd unreachable?)"; bad=1; }
  [ "$bad" -eq 0 ] && echo "cluster '$CLUSTER' usable" || echo "cluster '$CLUSTER' NOT usable"
  return "$bad"
}

down() {
  local purge=$1 i
  # Cancel every job first: job steps run under slurmstepd and would outlive
  # slurmd; cancelling also records them as CANCELLED in accounting.
  if running slurmctld; then
    squeue -h -o %i 2>/dev/null | xargs -r scancel 2>/dev/null || true
    for ((i = 0; i < 75; i++)); do running slurmstepd || break; sleep 0.2; done
  fi
  stop slurmd "$RUN/slurmd.pid"
  pkill -9 -x slurmstepd 2>/dev/null || true
  stop slurmctld "$RUN/slurmctld.pid"
  stop slurmdbd "$RUN/slurmdbd.pid"
  if [ "$purge" -eq 1 ]; then
    log "purging job state and accounting database"
    rm -rf "${STATE:?}/slurmctld" "${STATE:?}/slurmd"
    if command -v mariadbd >/dev/null; then
      install -d "$LOG" && start_mariadb && mariadb -e "DROP DATABASE IF EXISTS $DB"
    fi
  fi
  # Prefer a clean InnoDB shutdown; stop() then waits for the process to exit.
  if running mariadbd; then log "shutting down mariadbd"; mariadb-admin shutdown 2>/dev/null || true; fi
  stop mariadbd /run/mysqld/mysqld.pid
  stop munged /run/munge/munged.pid
  # Stopped daemons linger as zombies until PID 1 reaps them; wait for that
  # (bounded) so that `pgrep` right after `down` finds nothing.
  for ((i = 0; i < 50; i++)); do
    ps -C munged,mariadbd,mysqld_safe,slurmdbd,slurmctld,slurmd,slurmstepd >/dev/null || break
    sleep 0.2
  done
  echo "slurm cluster down"
}

case ${1:-} in
  up) up ;;
  down) case ${2:-} in "") down 0 ;; --purge) down 1 ;; *) echo "unknown option: $2" >&2; exit 2 ;; esac ;;
  status) status ;;
  *) echo "usage: $0 up | down [--purge] | status" >&2; exit 2 ;;
esac
