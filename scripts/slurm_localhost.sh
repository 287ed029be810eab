#!/usr/bin/env bash
# Bring up a single-node SLURM cluster on this host (controller and compute node are both localhost), for
# tests and for trying `-m launcher=slurm` sweeps without a real cluster.
#
#   scripts/slurm_localhost.sh          # install (Debian slurm-wlm + munge) if missing, configure, start, wait
#   eval "$(scripts/slurm_localhost.sh --env)"   # export SLURM_CONF (and PATH for the sacct below) in this shell
#   scripts/slurm_stop.sh               # end the daemons (by pid)
#
# Everything lives in $LORAMUX_SLURM_DIR (default /tmp/loramux-slurm): slurm.conf, state, spool, logs, pids.
# No accounting daemon runs: `sacct` needs `-c` (it reads the job-completion file), or use `scontrol show job`.
set -euo pipefail
DIR=${LORAMUX_SLURM_DIR:-/tmp/loramux-slurm}
CONF=$DIR/slurm.conf
ENV="export SLURM_CONF=$CONF PATH=$DIR/bin:\$PATH"
if [ "${1:-}" = "--env" ]; then echo "$ENV"; exit 0; fi

need_root() { [ "$(id -u)" = 0 ] || { echo "slurm_localhost: needs root (apt-get, munged, slurmd); run it with sudo" >&2; exit 1; }; }
if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
  need_root
  echo "slurm_localhost: installing slurm-wlm and munge from Debian"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends slurm-wlm munge >/dev/null \
    || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends slurm-wlm munge >/dev/null; }
fi
need_root

HOST=$(hostname -s)
CPUS=$(nproc)
# RealMemory must not exceed what slurmd detects, or the node goes DRAIN: take 80% of the free memory, in MB.
MEM=$(awk '/MemAvailable/ { printf "%d", $2 / 1024 * 0.8 }' /proc/meminfo)
mkdir -p "$DIR"/state "$DIR"/spool /run/munge
chown munge:munge /run/munge

# munge: one key for this host, daemon run as the munge user.
if [ ! -s /etc/munge/munge.key ]; then
  (umask 077; dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=128 status=none); chown munge:munge /etc/munge/munge.key
fi
if ! pgrep -x munged >/dev/null; then
  runuser -u munge -- munged
fi
munge -n | unmunge >/dev/null || { echo "slurm_localhost: munge does not work (see /var/log/munge/munged.log)" >&2; exit 1; }

cat > "$CONF.tmp" <<CONFEOF
# written by scripts/slurm_localhost.sh: a one-node cluster on $HOST
ClusterName=loramux
SlurmctldHost=$HOST
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc=$DIR/jobcomp.log
SchedulerType=sched/backfill
ReturnToService=2
MpiDefault=none
SlurmctldTimeout=30
SlurmdTimeout=30
MinJobAge=600
NodeName=$HOST CPUs=$CPUS RealMemory=$MEM State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
CONFEOF
mv "$CONF.tmp" "$CONF"
export SLURM_CONF=$CONF

# sacct without an accounting daemon: $DIR/bin/sacct answers the query submitit makes to follow a sweep's jobs
# (`sacct -o JobID,State,NodeList --parsable2 -j <id>...`) from squeue (queued/running jobs) and the job-completion
# file (finished ones, array tasks as <array id>_<task>), so a job that dies without a result (cancelled,
# killed, out of memory) ends the sweep instead of leaving it waiting. Other queries go to `sacct -c`.
mkdir -p "$DIR/bin"
REAL_SACCT=$(PATH=$(tr ':' '\n' <<<"$PATH" | grep -vx "$DIR/bin" | paste -sd:) command -v sacct)
cat > "$DIR/bin/sacct.tmp" <<SACCTEOF
#!/usr/bin/env bash
# written by scripts/slurm_localhost.sh: sacct for a cluster without accounting (see there)
REAL=$REAL_SACCT
case " \$* " in *" --parsable2 "*) ;; *) exec "\$REAL" -c "\$@" ;; esac
ids=(); while [ \$# -gt 0 ]; do [ "\$1" = -j ] && { ids+=("\$2"); shift; }; shift; done
want=" \${ids[*]} "
echo "JobID|State|NodeList"
{
  awk -v want="\$want" '{ delete f; for (i = 1; i <= NF; i++) { split(\$i, kv, "="); f[kv[1]] = substr(\$i, length(kv[1]) + 2) }
    id = f["JobId"]; main = id
    if (f["ArrayJobId"] != "" && f["ArrayJobId"] != "4294967294") { main = f["ArrayJobId"]; id = main "_" f["ArrayTaskId"] }
    if (index(want, " " main " ") || index(want, " " f["JobId"] " ")) print id "|" f["JobState"] "|" f["NodeList"] }' "$DIR/jobcomp.log" 2>/dev/null
  squeue -h -r -o '%i|%T|%N' -j "\$(IFS=,; echo "\${ids[*]}")" 2>/dev/null
} | awk -F'|' '{ state[\$1] = \$0; if (!(\$1 in seen)) { seen[\$1] = 1; order[++n] = \$1 } } END { for (i = 1; i <= n; i++) print state[order[i]] }'
SACCTEOF
chmod +x "$DIR/bin/sacct.tmp"; mv "$DIR/bin/sacct.tmp" "$DIR/bin/sacct"

running() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
running "$DIR/slurmctld.pid" || slurmctld -f "$CONF"
running "$DIR/slurmd.pid" || slurmd -f "$CONF"

for _ in $(seq 1 60); do
  state=$(sinfo -h -N -o '%T' 2>/dev/null | head -1 || true)
  case "$state" in
    idle|mixed|allocated) echo "slurm_localhost: node $HOST $state ($CPUS CPUs, ${MEM} MB); $ENV"; exit 0 ;;
    drain*|down*) scontrol update nodename="$HOST" state=resume 2>/dev/null || true ;;
  esac
  sleep 0.5
done
echo "slurm_localhost: node did not become idle; last state '${state:-none}'; logs: $DIR/slurmctld.log $DIR/slurmd.log" >&2
exit 1
