#!/usr/bin/env bash
# reproduce.sh <experiment> [overrides...]: one paper table, e.g. meteora_tasks, then its report; then each
# experiment of $THEN with its defaults (e.g. THEN=meteora_composite: the composite runs over the adapters and gates
# the first experiment left on the node).
source scripts/offline_gpu/chains/common.sh
reproduce "$@"
for exp in ${THEN:-}; do reproduce "$exp"; done
echo DONE
