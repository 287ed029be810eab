# Sourced by the chains: environment, and `step NAME CMD...` which logs start / exit to chain.log.
source scripts/offline_gpu/env.sh
step() { local name=$1; shift; echo "$name started $(date +%T)"; "$@" > "/root/lmx/logs/$name.log" 2>&1;
         echo "$name exit $? $(date +%T)"; }
