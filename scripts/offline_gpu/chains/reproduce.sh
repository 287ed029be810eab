#!/usr/bin/env bash
# reproduce.sh <experiment> [overrides...]: one paper table, e.g. meteora_tasks, then its report; then each
# experiment of $THEN with its defaults (e.g. THEN=meteora_composite: the composite runs over the adapters and gates
# the first experiment left on the node), each given $THEN_ARG where it is set: one override for all of them (e.g.
# the same cap on the gates' time as the first experiment's, so that two variants of the gates get one budget).
source scripts/offline_gpu/chains/common.sh
reproduce "$@"
for exp in ${THEN:-}; do reproduce "$exp" ${THEN_ARG:+"$THEN_ARG"}; done
echo DONE
