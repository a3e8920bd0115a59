#!/usr/bin/env bash
# A two-node SLURM on this machine, for the tests of the SLURM backend (tests/slurm): munged,
# slurmctld and two slurmd (nodes lg1 and lg2, both at 127.0.0.1 on ports of their own, each
# with every CPU of this machine: `slurmd -N <node>` runs one daemon per node name), with a
# low-priority "spot" partition that higher-tier jobs preempt
# (PreemptMode=REQUEUE, a GraceTime), a "spotshort" one whose GraceTime is shorter than a full save,
# and a high-priority "high" one. Job accounting is real: a MariaDB (started here, no systemd) holds
# slurmdbd's database, so `sacct` answers with every run of a requeued job (the bill of
# `lightning-grid status`). Idempotent: a cluster already up with this configuration is left
# as it is. Needs root and Debian (apt); anywhere else it says why on one line and exits 3.
#
#   .ci/slurm-up.sh          install if needed, configure, start; exit 0 when `sinfo` answers
#   .ci/slurm-up.sh --down   stop the daemons it started (MariaDB too, when it started it)
set -euo pipefail

STATE=/var/lib/lightning-grid-slurm
CONF=/etc/slurm/slurm.conf
NODES="lg1 lg2"
# slurmd.pid: the one slurmd of an earlier one-node version, stopped once, then its file removed.
PIDFILES="$STATE/slurmd-lg1.pid $STATE/slurmd-lg2.pid $STATE/slurmd.pid $STATE/slurmctld.pid"
DBDCONF=/etc/slurm/slurmdbd.conf
DBDPID=$STATE/slurmdbd.pid
# Written only when this script started the database server (one started by someone else stays
# up); in /run/mysqld, where the server (user mysql) may write it.
DBPID=/run/mysqld/lightning-grid-mariadb.pid
DBSOCK=/run/mysqld/mysqld.sock
# The database listens only on this test machine (socket, 127.0.0.1): a fixed password is fine.
DBPASS=lgtest-accounting

if [ "$(id -u)" -ne 0 ]; then
  echo "slurm-up: needs root (installs slurm-wlm, slurmdbd, mariadb-server and munge, starts them)" >&2
  exit 3
fi

if [ "${1:-}" = "--down" ]; then
  # slurmctld before slurmdbd (it hands its last records over), slurmdbd before the database.
  for pidfile in $PIDFILES $DBDPID $DBPID; do
    [ -f "$pidfile" ] && kill "$(cat "$pidfile")" 2>/dev/null || true
  done
  for _ in $(seq 1 60); do  # MariaDB flushes its tables on SIGTERM: wait, so a restart finds it gone
    [ -f "$DBPID" ] && kill -0 "$(cat "$DBPID")" 2>/dev/null || break
    sleep 0.5
  done
  rm -f "$STATE/slurmd.pid" "$DBPID"
  exit 0
fi

if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null || ! command -v slurmdbd >/dev/null \
  || ! command -v mariadbd >/dev/null; then
  if ! command -v apt-get >/dev/null; then
    echo "slurm-up: slurm-wlm, slurmdbd, mariadb-server and munge are not all installed and there is no apt-get" >&2
    exit 3
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq slurm-wlm slurmdbd mariadb-server munge >/dev/null
fi

host=$(hostname -s)
cpus=$(nproc)
mkdir -p "$STATE/ctld" "$STATE/d-lg1" "$STATE/d-lg2" /etc/slurm /run/munge /var/log/munge /var/lib/munge
cat >"$CONF.new" <<EOF
# Written by lightning-grid's .ci/slurm-up.sh: a two-node test cluster on one machine.
ClusterName=lgtest
SlurmctldHost=$host
SlurmUser=root
AuthType=auth/munge
# A requeued job waits cred_expire + 1 s before it may start again (default 120 s): short here.
AuthInfo=cred_expire=5
StateSaveLocation=$STATE/ctld
# %n: the node's name, one spool, pid and log per slurmd (several slurmd on one host).
SlurmdSpoolDir=$STATE/d-%n
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd-%n.pid
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd-%n.log
# No cgroups in a container: follow a job's processes through their parents.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
# Job records (start, end, elapsed: what sacct and the bill read) go to slurmdbd; slurmctld writes
# them itself. No per-step usage gathering (no /proc polling in slurmstepd): nothing here reads it.
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=$host
AccountingStoragePort=6819
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=1
ReturnToService=2
MinJobAge=600
JobRequeue=1
KillWait=5
MessageTimeout=10
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
# Two nodes, one machine: each slurmd listens on its own port of 127.0.0.1 (NodeAddr is how a
# job's nodes reach each other; the names lg1/lg2 resolve nowhere, so SLURM says the address).
NodeName=lg1 NodeHostname=$host NodeAddr=127.0.0.1 Port=6921 CPUs=$cpus State=UNKNOWN
NodeName=lg2 NodeHostname=$host NodeAddr=127.0.0.1 Port=6922 CPUs=$cpus State=UNKNOWN
PartitionName=spot Nodes=lg[1-2] Default=YES PriorityTier=1 PreemptMode=REQUEUE GraceTime=20 MaxTime=INFINITE State=UP
PartitionName=spotshort Nodes=lg[1-2] PriorityTier=1 PreemptMode=REQUEUE GraceTime=5 MaxTime=INFINITE State=UP
PartitionName=high Nodes=lg[1-2] PriorityTier=10 PreemptMode=OFF MaxTime=INFINITE State=UP
EOF

cat >"$DBDCONF.new" <<EOF
# Written by lightning-grid's .ci/slurm-up.sh: the accounting daemon of the test cluster.
AuthType=auth/munge
DbdHost=$host
DbdPort=6819
SlurmUser=root
PidFile=$DBDPID
LogFile=$STATE/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=localhost
StoragePort=3306
StorageUser=slurm
StoragePass=$DBPASS
StorageLoc=slurm_acct_db
EOF
chmod 600 "$DBDCONF.new"  # slurmdbd refuses a config others can read (it holds the password)

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
if [ -f "$CONF" ] && cmp -s "$CONF" "$CONF.new" && [ -f "$DBDCONF" ] && cmp -s "$DBDCONF" "$DBDCONF.new" \
  && sinfo -h >/dev/null 2>&1 && alive "$STATE/slurmd-lg1.pid" && alive "$STATE/slurmd-lg2.pid" \
  && alive "$DBDPID" && sacct -n -X -S now >/dev/null 2>&1; then
  rm -f "$CONF.new" "$DBDCONF.new"
  exit 0  # already up with this configuration
fi
mv "$CONF.new" "$CONF"

if [ ! -s /etc/munge/munge.key ]; then
  mkdir -p /etc/munge
  dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
fi
chown -R munge:munge /etc/munge /run/munge /var/log/munge /var/lib/munge 2>/dev/null || true
chmod 0400 /etc/munge/munge.key
if ! munge -n </dev/null >/dev/null 2>&1; then
  runuser -u munge -- /usr/sbin/munged || /usr/sbin/munged --force
fi

for pidfile in $PIDFILES; do
  if [ -f "$pidfile" ] && kill "$(cat "$pidfile")" 2>/dev/null; then
    sleep 1
  fi
done
rm -f "$STATE/slurmd.pid"

# The database: MariaDB as Debian installed it (its data directory initialised by the package),
# started in the background here since a container has no systemd; its socket says it is up.
if ! mariadb-admin --socket="$DBSOCK" ping >/dev/null 2>&1; then
  mkdir -p /run/mysqld
  chown mysql:mysql /run/mysqld
  # setsid, and no stdout/stderr of ours: whoever waits for this script's output is not kept waiting.
  setsid /usr/sbin/mariadbd --user=mysql --pid-file="$DBPID" --socket="$DBSOCK" \
    </dev/null >>"$STATE/mariadb.log" 2>&1 &
  for _ in $(seq 1 120); do
    mariadb-admin --socket="$DBSOCK" ping >/dev/null 2>&1 && break
    sleep 0.5
  done
  if ! mariadb-admin --socket="$DBSOCK" ping >/dev/null 2>&1; then
    echo "slurm-up: MariaDB did not come up; see $STATE/mariadb.log" >&2
    exit 1
  fi
fi
# root reaches MariaDB through its socket (unix_socket authentication, Debian's default).
mariadb --socket="$DBSOCK" -e "CREATE DATABASE IF NOT EXISTS slurm_acct_db;
  CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DBPASS';
  ALTER USER 'slurm'@'localhost' IDENTIFIED BY '$DBPASS';
  GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';"

if ! cmp -s "$DBDCONF" "$DBDCONF.new" || ! alive "$DBDPID"; then
  if [ -f "$DBDPID" ] && kill "$(cat "$DBDPID")" 2>/dev/null; then
    sleep 1
  fi
  mv "$DBDCONF.new" "$DBDCONF"
  chown root:root "$DBDCONF"
  # Daemonizes and writes $DBDPID; its own log is LogFile. No stdout/stderr of ours (see mariadbd).
  /usr/sbin/slurmdbd </dev/null >>"$STATE/slurmdbd.out" 2>&1
else
  rm -f "$DBDCONF.new"
fi
# The cluster must be known to the database before slurmctld sends it records.
for _ in $(seq 1 60); do
  sacctmgr -n -P list cluster format=Cluster >/dev/null 2>&1 && break
  sleep 0.5
done
if ! sacctmgr -n -P list cluster format=Cluster 2>/dev/null | grep -qx lgtest; then
  sacctmgr -i add cluster lgtest >/dev/null
fi

/usr/sbin/slurmctld -c   # -c: a clean state, nothing queued from an earlier run
for node in $NODES; do
  /usr/sbin/slurmd -N "$node"
done

for _ in $(seq 1 60); do
  if [ "$(sinfo -h -N -o %T 2>/dev/null | grep -cE '^(idle|mixed|allocated)')" -ge 6 ]; then
    exit 0  # both nodes up, in each of the three partitions
  fi
  sleep 0.5
done
echo "slurm-up: slurmctld/slurmd did not come up; see $STATE/slurmctld.log and $STATE/slurmd-lg*.log" >&2
exit 1
