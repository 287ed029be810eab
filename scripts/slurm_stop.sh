#!/usr/bin/env bash
# End the daemons started by scripts/slurm_localhost.sh, by pid (munged is left running: other tools may share it).
set -u
DIR=${LORAMUX_SLURM_DIR:-/tmp/loramux-slurm}
for d in slurmd slurmctld; do
  pidf=$DIR/$d.pid
  if [ -s "$pidf" ] && kill -0 "$(cat "$pidf")" 2>/dev/null; then
    kill "$(cat "$pidf")" && echo "slurm_stop: ended $d ($(cat "$pidf"))"
    for _ in $(seq 1 20); do kill -0 "$(cat "$pidf")" 2>/dev/null || break; sleep 0.25; done
  fi
  rm -f "$pidf"
done
