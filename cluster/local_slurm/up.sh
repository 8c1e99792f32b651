#!/usr/bin/env bash
# cluster/local_slurm/up.sh - a real SLURM cluster on this one machine, for the tests (run as root).
#
# N slurmd daemons on one host act as N nodes (node1..nodeN), so multi-node jobs, srun steps, --signal and
# requeue are exercised for real. Idempotent: with everything up it only re-checks; when the generated
# slurm.conf changed, the daemons are restarted. Debian 12's packages (slurm-wlm 22.05); no systemd, no cgroups.
# Takes ~10 s when the packages are installed, ~1 min more to apt-get them.
#
# Knobs (environment):
#   TARFLOW_SLURM_NODES=2       slurmd "nodes" (node1..nodeN, all on 127.0.0.1)
#   TARFLOW_SLURM_CPUS=4        CPUs per node; may exceed the real cores (config_overrides), so that a few
#                               small test jobs run side by side on a 2-core machine
#   TARFLOW_SLURM_PARTITION=debug
#   TARFLOW_SLURM_KILLWAIT=10   seconds between SIGTERM and SIGKILL on cancel / time limit
#   TARFLOW_SLURM_SMOKE=1       finish with `srun -N NODES hostname` (0 to skip)
#   TARFLOW_SLURM_TIMEOUT=60    seconds to wait for daemons and nodes
#
# Gotchas, each learned the hard way (see the matching lines below):
# - No systemd here: the daemons are started directly, and Debian's policy-rc.d stops apt from starting them.
# - No cgroups: proctrack/linuxproc + task/none never touch them, so no cgroup.conf is needed.
# - Several slurmd on one host: one NodeName line each with the same NodeHostname, its own Port, and
#   `slurmd -N name`; spool dir and pid file must be per node (%n) or they overwrite each other.
# - A requeued job may start again only after cred_expire seconds (default 120): lowered to 10.
# - The scheduler runs every 60 s by default; after a requeue that is a minute of nothing: sched_interval=5.
# - `#SBATCH --signal=B:USR1@S` is checked by slurmctld's timer, about every 30 s: the signal comes up to ~30 s
#   late (or early). Tests that need exact timing send it themselves: `scancel --batch --signal=USR1 JOBID`.
# - bash runs a trap only between commands: a batch script that sits in a foreground `srun` never sees USR1.
#   Run srun in the background and `wait` for it (in a loop: a trapped signal ends `wait` early).
# - Without accounting (slurmdbd) `sacct` does not work; finished jobs stay visible to `scontrol show job` for
#   MinJobAge=300 s, which is what the tests read.
# - The host name must resolve (slurmd looks itself up), and the munge key must be owned by munge, mode 0400.
set -Eeuo pipefail

NODES=${TARFLOW_SLURM_NODES:-2}
CPUS=${TARFLOW_SLURM_CPUS:-4}
PARTITION=${TARFLOW_SLURM_PARTITION:-debug}
KILLWAIT=${TARFLOW_SLURM_KILLWAIT:-10}
SMOKE=${TARFLOW_SLURM_SMOKE:-1}
TIMEOUT=${TARFLOW_SLURM_TIMEOUT:-60}
CONF=/etc/slurm/slurm.conf
LOGDIR=/var/log/slurm
T0=$(date +%s)

log() { printf '[local_slurm up %3ss] %s\n' "$(( $(date +%s) - T0 ))" "$*"; }
die() {
  printf '[local_slurm up] ERROR: %s\n' "$*" >&2
  for f in "$LOGDIR"/slurmctld.log "$LOGDIR"/slurmd-*.log /var/log/munge/munged.log; do
    [ -f "$f" ] && { echo "---- last lines of $f ----" >&2; tail -n 15 "$f" >&2; }
  done
  exit 1
}
trap 'die "command failed at line $LINENO: $BASH_COMMAND"' ERR

[ "$(id -u)" -eq 0 ] || die "must run as root (it installs packages and starts daemons)"
case "$NODES" in ''|*[!0-9]*|0) die "TARFLOW_SLURM_NODES must be a positive integer, got '$NODES'";; esac
case "$CPUS" in ''|*[!0-9]*|0) die "TARFLOW_SLURM_CPUS must be a positive integer, got '$CPUS'";; esac

# Is PID alive and running program $2? (pid files can outlive their process, and pids get reused)
pid_is() { [ -n "${1:-}" ] && [ -r "/proc/$1/comm" ] && grep -qx "$2" "/proc/$1/comm"; }
pidfile_is() { [ -s "$1" ] && pid_is "$(cat "$1")" "$2"; }
wait_for() { # wait_for SECONDS WHAT CMD...
  local t=$1 what=$2; shift 2
  local end=$(( $(date +%s) + t ))
  until "$@" >/dev/null 2>&1; do
    [ "$(date +%s)" -ge "$end" ] && die "timed out after ${t}s waiting for $what"
    sleep 0.5
  done
}
stop_pid() { # stop_pid PID COMM: SIGTERM, then SIGKILL after 10 s
  local p=$1 c=$2
  pid_is "$p" "$c" || return 0
  kill "$p" 2>/dev/null || true
  for _ in $(seq 1 40); do pid_is "$p" "$c" || return 0; sleep 0.25; done
  kill -9 "$p" 2>/dev/null || true
}

# ---------------------------------------------------------------- 1. packages
missing=0
for b in slurmctld slurmd sbatch srun scontrol sinfo munged munge unmunge; do
  command -v "$b" >/dev/null 2>&1 || missing=1
done
if [ "$missing" = 1 ]; then
  log "installing slurmctld slurmd slurm-client munge (apt)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq || die "apt-get update failed"
  apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/tmp/local_slurm.apt.log 2>&1 \
    || { tail -n 30 /tmp/local_slurm.apt.log >&2; die "apt-get install failed (log: /tmp/local_slurm.apt.log)"; }
fi
log "packages: $(slurmd -V)"
id slurm >/dev/null 2>&1 || die "user 'slurm' missing (the slurm packages create it)"
id munge >/dev/null 2>&1 || die "user 'munge' missing (the munge package creates it)"

# ---------------------------------------------------------------- 2. names
H=$(hostname -s)
[ -n "$H" ] || die "hostname -s is empty"
getent hosts "$H" >/dev/null || { log "adding $H to /etc/hosts"; echo "127.0.0.1 $H" >> /etc/hosts; }
NODENAMES=$(seq -f 'node%g' 1 "$NODES" | tr '\n' ' ')
for n in $NODENAMES; do  # jobs resolve the first node of their allocation for the rendezvous
  getent hosts "$n" >/dev/null || echo "127.0.0.1 $n" >> /etc/hosts
done

# ---------------------------------------------------------------- 3. munge (authentication between daemons)
if [ ! -s /etc/munge/munge.key ]; then
  log "creating the munge key"
  mkdir -p /etc/munge
  if command -v mungekey >/dev/null; then mungekey --create --keyfile=/etc/munge/munge.key --force
  else dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none; fi
fi
chown munge:munge /etc/munge /etc/munge/munge.key
chmod 0700 /etc/munge; chmod 0400 /etc/munge/munge.key
install -d -o munge -g munge -m 0755 /run/munge
install -d -o munge -g munge -m 0700 /var/log/munge /var/lib/munge
if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  log "munged already running"
else
  log "starting munged"
  runuser -u munge -- /usr/sbin/munged || die "munged failed to start"
  wait_for 15 "a munge credential round trip" sh -c 'munge -n | unmunge'
fi

# ---------------------------------------------------------------- 4. slurm.conf
MEM_DETECTED=$(( $(awk '/MemTotal/{print $2}' /proc/meminfo) / 1024 ))
MEM=$(( MEM_DETECTED * 9 / 10 / NODES ))
NODE_LINES=""; i=0
for n in $NODENAMES; do
  i=$((i + 1))
  NODE_LINES+="NodeName=$n NodeHostname=$H NodeAddr=127.0.0.1 Port=$((6820 + i)) CPUs=$CPUS RealMemory=$MEM State=UNKNOWN"$'\n'
done
PART_NODES=$(echo $NODENAMES | tr ' ' ',')

NEWCONF=$(cat <<EOF
# generated by cluster/local_slurm/up.sh - a one-machine test cluster, no cgroups, no accounting
ClusterName=tarflow
SlurmctldHost=$H(127.0.0.1)
SlurmUser=slurm
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# a requeued job waits cred_expire seconds before it may start again (default 120)
AuthInfo=cred_expire=10
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
# schedule every few seconds, not every minute (matters after a requeue)
SchedulerParameters=sched_interval=5,bf_interval=5
# trust the CPU and memory numbers below even where they exceed the hardware
SlurmdParameters=config_overrides
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd/%n
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd-%n.pid
SlurmctldLogFile=$LOGDIR/slurmctld.log
SlurmdLogFile=$LOGDIR/slurmd-%n.log
SlurmctldPort=6817
SlurmdPort=6818
MailProg=/bin/true
ReturnToService=2
KillWait=$KILLWAIT
MinJobAge=300
InactiveLimit=0
Waittime=0
SlurmdTimeout=300
SlurmctldTimeout=120
${NODE_LINES}PartitionName=$PARTITION Nodes=$PART_NODES Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
)

mkdir -p /etc/slurm
install -d -o slurm -g slurm -m 0755 /var/spool/slurmctld "$LOGDIR"
install -d -o root -g root -m 0755 /var/spool/slurmd
for n in $NODENAMES; do install -d -m 0755 "/var/spool/slurmd/$n"; done

conf_changed=0
if [ ! -f "$CONF" ] || [ "$(cat "$CONF")" != "$NEWCONF" ]; then
  printf '%s\n' "$NEWCONF" > "$CONF.tmp" && mv "$CONF.tmp" "$CONF"
  chmod 0644 "$CONF"
  conf_changed=1
  log "wrote $CONF (nodes: $NODENAMES; CPUs=$CPUS RealMemory=${MEM}MB each; partition $PARTITION)"
fi

# ---------------------------------------------------------------- 5. daemons
if [ "$conf_changed" = 1 ]; then  # a slurmd for a node that no longer exists must go too
  for f in /run/slurmd-*.pid /run/slurmd.pid; do
    [ -s "$f" ] && { log "config changed: stopping slurmd pid $(cat "$f")"; stop_pid "$(cat "$f")" slurmd; rm -f "$f"; }
  done
  if pidfile_is /run/slurmctld.pid slurmctld; then
    log "config changed: stopping slurmctld pid $(cat /run/slurmctld.pid)"
    stop_pid "$(cat /run/slurmctld.pid)" slurmctld
  fi
fi

if pidfile_is /run/slurmctld.pid slurmctld; then
  log "slurmctld already running (pid $(cat /run/slurmctld.pid))"
else
  log "starting slurmctld"
  slurmctld || die "slurmctld failed to start (see $LOGDIR/slurmctld.log)"
fi
wait_for "$TIMEOUT" "slurmctld to answer 'scontrol ping'" sh -c 'scontrol ping | grep -q UP'

for n in $NODENAMES; do
  if pidfile_is "/run/slurmd-$n.pid" slurmd; then
    log "slurmd $n already running (pid $(cat "/run/slurmd-$n.pid"))"
  else
    log "starting slurmd $n"
    slurmd -N "$n" || die "slurmd $n failed to start (see $LOGDIR/slurmd-$n.log)"
  fi
done

# ---------------------------------------------------------------- 6. nodes idle
nodes_ready() {
  local s
  for n in $NODENAMES; do
    s=$(sinfo -h -n "$n" -o '%T' 2>/dev/null | head -n1)
    case "$s" in
      idle*|mixed*|allocated*|completing*) ;;
      drain*|down*|fail*) scontrol update NodeName="$n" State=RESUME >/dev/null 2>&1 || true; return 1;;
      *) return 1;;
    esac
  done
}
wait_for "$TIMEOUT" "nodes $NODENAMES to become idle" nodes_ready

# ---------------------------------------------------------------- 7. smoke test
if [ "$SMOKE" = 1 ]; then
  out=$(timeout 60 srun -N "$NODES" --ntasks-per-node=1 -t 1 -J local_slurm_smoke hostname 2>&1) \
    || die "smoke test 'srun hostname' failed: $out"
  log "smoke test ok: srun -N $NODES hostname -> $(echo $out)"
  all_idle() { [ -z "$(sinfo -h -N -o '%T' | grep -v '^idle')" ]; }
  wait_for 30 "nodes to be idle again after the smoke test" all_idle  # so the next job starts at once
fi
log "SLURM is up: $(sinfo -h -o '%P %a %D %T %N' | tr '\n' ';')"
