#!/usr/bin/env bash
# beside.sh <experiment> [<experiment> ...]: several paper tables at once on one GPU, each its own
# `pipeline.reproduce` (its own outputs/<name>, log /root/lmx/logs/<name>.log, PARALLEL processes each), e.g. two
# variants of one experiment that differ only in their route step. A small model leaves the GPU mostly idle, so the
# routes and evaluations of two chains side by side take little longer than one's. Their fine-tuning does not fit
# side by side: a joint run of 28 adapters holds ~64 GB, so two of them beside LoRA-B ran out of an H200's 140 GB
# (020c30e). Each experiment therefore starts once the previous one's finetune steps have all finished.
source scripts/offline_gpu/chains/common.sh
finetuned() {  # every finetune step of experiment $1 has its metrics.json
  local d=${LMX_ROOT:-/root/lmx}/$1/finetune n
  n=$(ls -d "$d"/*/ 2>/dev/null | wc -l)
  (( n > 0 )) && (( $(ls "$d"/*/metrics.json 2>/dev/null | wc -l) == n ))
}
prev="" pid=""
for exp in "$@"; do
  if [ -n "$prev" ]; then
    until finetuned "$prev" || ! kill -0 "$pid" 2>/dev/null; do sleep 10; done
  fi
  reproduce "$exp" & pid=$!
  prev=$exp
done
wait
echo DONE
