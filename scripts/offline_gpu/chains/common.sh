# Sourced by the chains: environment; `step NAME CMD...` logs start / exit to chain.log; `reproduce EXPERIMENT
# [overrides...]` is one paper table as a step (PARALLEL: reproduce's parallel=, default 2: several evaluate
# processes share the GPU's memory).
source scripts/offline_gpu/env.sh
step() { local name=$1; shift; echo "$name started $(date +%T)"; "$@" > "/root/lmx/logs/$name.log" 2>&1;
         echo "$name exit $? $(date +%T)"; }
reproduce() { local exp=$1; shift; step "$exp" python3 -m pipeline.reproduce "experiment=$exp" trainer=gpu \
                model.device=cuda logger=csv "parallel=${PARALLEL:-2}" "$@"; }
