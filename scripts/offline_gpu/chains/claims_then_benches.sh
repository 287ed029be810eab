#!/usr/bin/env bash
# claims_then_benches.sh <experiment> [<experiment> ...]: the experiments side by side (chains/beside.sh: each
# started once the previous one's fine-tuning is done), then, on a quiet GPU, what the speed issues still need:
# the e2e decode table at batch 1 and 8 (graph engine, all 7 projections, the grouped strategies, $E2E_REPEATS
# interleaved rounds, default 15: at 5 rounds run-to-run drift flipped verdicts), and the training-throughput
# targets under CUDA graphs with a profile of one batch-16 step of peft and loramux_single (why the single adapter
# is 0.79x peft at batch 16 and 1.06x at 64, 020c30e). Benchmarks go last: they need the GPU to themselves, and
# the experiments are what a short session must not lose.
source scripts/offline_gpu/chains/common.sh
bash scripts/offline_gpu/chains/beside.sh "$@" | grep -v '^DONE'
mkdir -p /root/lmx/tables && cp outputs/tables/e2e_decode.json /root/lmx/tables/
step e2e timeout 420 python3 -m pipeline.bench experiment=e2e_decode 'bench.e2e.targets=[all7]' \
  'bench.e2e.batch_sizes=[1,8]' 'bench.e2e.engines=[graph]' bench.e2e.merge=true "bench.e2e.repeats=${E2E_REPEATS:-15}" \
  'bench.e2e.strategies=[base,peft,oracle+grouped,meteora-top2+grouped,dlp-nucleus2+grouped]'
step train timeout 300 python3 -m pipeline.bench experiment=train_throughput \
  'bench.train.variants=[peft_single,loramux_single,loramux_joint,loramux_gates]' 'bench.train.compiled=[false]' \
  'bench.train.graphs=[true]' 'bench.train.batch_sizes=[16,64]' 'bench.train.extra_batch_sizes=[128]' \
  'bench.train.profile=[peft_single/bf16/eager/graph/b16,loramux_single/bf16/eager/graph/b16]'
echo DONE
