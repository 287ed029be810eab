#!/usr/bin/env bash
# The decode epilogue micro-benchmark, the e2e decode table (graph engine, all 7 projections, batches
# $E2E_BATCHES (default [1,8]), strategies $E2E_STRATEGIES, merged into the committed table), then meteora_tasks
# (args: extra reproduce overrides), then each experiment of $THEN (e.g. THEN="meteora_composite head_to_head").
source scripts/offline_gpu/chains/common.sh
mkdir -p /root/lmx/tables && cp outputs/tables/e2e_decode.json /root/lmx/tables/
step epilogue timeout 300 python3 -m kernels.bench --epilogue --out /root/lmx/kbe
step e2e timeout 900 python3 -m pipeline.bench experiment=e2e_decode 'bench.e2e.targets=[all7]' \
  "bench.e2e.batch_sizes=${E2E_BATCHES:-[1,8]}" 'bench.e2e.engines=[graph]' bench.e2e.merge=true \
  "bench.e2e.strategies=${E2E_STRATEGIES:-[base,peft,oracle,oracle+grouped,oracle+onelaunch,meteora-top2+grouped,dlp-nucleus2+grouped]}"
reproduce meteora_tasks "$@"
for exp in ${THEN:-}; do reproduce "$exp"; done
echo DONE
