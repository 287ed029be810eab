#!/usr/bin/env bash
# reproduce.sh <experiment> [overrides...]: one paper table, e.g. meteora_tasks, then its report.
source scripts/offline_gpu/chains/common.sh
reproduce "$@"
echo DONE
