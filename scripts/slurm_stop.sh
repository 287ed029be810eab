#!/usr/bin/env bash
# End the daemons started by scripts/slurm_localhost.sh, by pid, and wait until they are gone
# (munged is left running: other tools may share it).
set -u
DIR=${LORAMUX_SLURM_DIR:-/tmp/loramux-slurm}
for d in slurmd slurmctld; do
  pid=$(cat "$DIR/$d.pid" 2>/dev/null || true)
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
    kill "$pid"
    for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
    kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
    echo "slurm_stop: ended $d ($pid)"
  fi
  rm -f "$DIR/$d.pid"
done
