#!/usr/bin/env bash
# cluster/local_slurm/down.sh - stop the cluster that up.sh started (by the pids in its pid files, never by name).
#   --munge   also stop munged
#   --purge   also delete controller state, slurmd spool dirs and slurm logs (job ids restart from 1)
# Packages, /etc/slurm/slurm.conf and the munge key stay, so the next up.sh takes seconds.
set -uo pipefail
STOP_MUNGE=0; PURGE=0
for a in "$@"; do
  case "$a" in
    --munge) STOP_MUNGE=1;;
    --purge) PURGE=1;;
    -h|--help) sed -n '2,5p' "$0"; exit 0;;
    *) echo "[local_slurm down] ERROR: unknown option $a" >&2; exit 2;;
  esac
done
[ "$(id -u)" -eq 0 ] || { echo "[local_slurm down] ERROR: must run as root" >&2; exit 1; }

pid_is() { [ -n "${1:-}" ] && [ -r "/proc/$1/comm" ] && grep -qx "$2" "/proc/$1/comm"; }
stop_pidfile() { # stop_pidfile FILE COMM
  local f=$1 c=$2 p
  [ -s "$f" ] || return 0
  p=$(cat "$f")
  if pid_is "$p" "$c"; then
    echo "[local_slurm down] stopping $c pid $p"
    kill "$p" 2>/dev/null
    for _ in $(seq 1 60); do pid_is "$p" "$c" || break; sleep 0.25; done
    if pid_is "$p" "$c"; then echo "[local_slurm down] $c pid $p ignored SIGTERM: SIGKILL"; kill -9 "$p"; fi
  fi
  rm -f "$f"
}

# cancel what is queued or running first, so that no job's processes outlive their slurmd
if [ -s /run/slurmctld.pid ] && pid_is "$(cat /run/slurmctld.pid)" slurmctld; then
  jobs=$(squeue -h -o %i 2>/dev/null | tr '\n' ' ')
  if [ -n "${jobs// /}" ]; then
    echo "[local_slurm down] cancelling jobs: $jobs"
    scancel $jobs 2>/dev/null || true
    for _ in $(seq 1 60); do [ -z "$(squeue -h -t R,CG -o %i 2>/dev/null)" ] && break; sleep 0.5; done
  fi
fi
for f in /run/slurmd-*.pid /run/slurmd.pid; do [ -e "$f" ] && stop_pidfile "$f" slurmd; done
stop_pidfile /run/slurmctld.pid slurmctld
[ "$STOP_MUNGE" = 1 ] && stop_pidfile /run/munge/munged.pid munged

if [ "$PURGE" = 1 ]; then
  echo "[local_slurm down] purging /var/spool/slurmctld /var/spool/slurmd /var/log/slurm"
  rm -rf /var/spool/slurmctld/* /var/spool/slurmd/* /var/log/slurm/*
fi
left=$(for f in /proc/[0-9]*/comm; do c=$(cat "$f" 2>/dev/null); case "$c" in slurmctld|slurmd|slurmstepd|slurmscriptd) echo "${f//[!0-9]/}:$c";; esac; done | tr '\n' ' ')
[ -n "$left" ] && echo "[local_slurm down] WARNING: slurm processes still present: $left"
echo "[local_slurm down] done"
