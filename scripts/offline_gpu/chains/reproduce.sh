#!/usr/bin/env bash
# reproduce.sh <experiment> [overrides...]: one paper table, e.g. meteora_tasks, then its report
# (PARALLEL: reproduce's parallel=, default 2: several evaluate processes share the GPU's memory).
source scripts/offline_gpu/chains/common.sh
exp=$1; shift
step "$exp" python3 -m pipeline.reproduce "experiment=$exp" trainer=gpu model.device=cuda logger=csv \
  "parallel=${PARALLEL:-2}" "$@"
echo DONE
