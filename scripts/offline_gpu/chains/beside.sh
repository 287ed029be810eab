#!/usr/bin/env bash
# beside.sh <experiment> [<experiment> ...]: several paper tables at once on one GPU, each its own
# `pipeline.reproduce` (its own outputs/<name>, log /root/lmx/logs/<name>.log, PARALLEL processes each), e.g. two
# variants of one experiment that differ only in their route step. A small model leaves the GPU mostly idle, so two
# chains side by side take little longer than one.
source scripts/offline_gpu/chains/common.sh
for exp in "$@"; do reproduce "$exp" & done
wait
echo DONE
