#!/usr/bin/env bash
# speed_then.sh [<experiment> ...]: the speed issues' benchmarks first, on a quiet GPU, then the experiments given
# (one after another, e.g. dlp_latency). A 30-minute session holds the benchmarks (~20 minutes) and perhaps a short
# experiment; the long paper tables (meteora_tasks + its composite runs) need a session of their own.
#   train: every training-throughput variant at batch 16 and 64 (the gates also at 128 and 256: their best batch),
#          the whole step as one CUDA graph, one table (outputs/tables/train_throughput.{json,md}) that decides
#          every target; profiles of one step of peft and loramux_single at batch 16 and of the gates at batch 64.
#   train_compiled: peft and the gates with their decoder layers compiled in torch's reduce-overhead mode (each
#          layer's forward and backward fused by inductor and replayed as CUDA graphs; a compiled layer inside the
#          whole-step graph recompiled on the capture pass), batch 64 and 128, its own table: does fusion beat the
#          whole-step graph? (the gates' 150k tokens/s target; in a compiled gate step's profile at 9d88c5b the
#          device worked ~84 ms at batch 64 against 149 ms for the graphed eager step).
#   train_compiled_graph: compiled layers inside the whole-step graph (bench.train.compiled_graph), peft and the
#          gates at batch 64, with dynamo's recompile log: at 412f547 the capture pass recompiled; which guard failed?
#   e2e_eager: the eager target (oracle <= peft, all 7 projections, batch 1), 9 rounds, merged into the same table.
#   kernel_bench: the op micro-benchmark at this commit (outputs/tables/kernel_bench.{json,md}).
#   e2e:   the e2e decode table at batch 1 and 8 (graph engine, all 7 projections, the grouped strategies,
#          $E2E_REPEATS interleaved rounds, default 15), merged into the committed table.
source scripts/offline_gpu/chains/common.sh
mkdir -p /root/lmx/tables && cp outputs/tables/e2e_decode.json /root/lmx/tables/
step train timeout 540 python3 -m pipeline.bench experiment=train_throughput bench.train.repeats=9 \
  'bench.train.variants=[peft_single,loramux_single,loramux_joint,loramux_gates]' 'bench.train.compiled=[false]' \
  'bench.train.compile_modes=[default]' 'bench.train.graphs=[true]' 'bench.train.batch_sizes=[16,64]' \
  'bench.train.extra_batch_sizes=[128,256]' \
  'bench.train.profile=[peft_single/bf16/eager/graph/b16,loramux_single/bf16/eager/graph/b16,loramux_gates/bf16/eager/graph/b64]'
step train_compiled timeout 360 python3 -m pipeline.bench experiment=train_throughput bench.max_seconds=200 bench.train.repeats=9 \
  'bench.train.variants=[peft_single,loramux_gates]' 'bench.train.compiled=[true]' \
  'bench.train.compile_modes=[reduce-overhead]' 'bench.train.graphs=[false]' 'bench.train.batch_sizes=[64,128]' \
  'bench.train.extra_batch_sizes=[]' bench.train.table_name=train_throughput_compiled \
  "bench.train.profile=['loramux_gates/bf16/compiled[reduce-overhead]/b64']"
step e2e timeout 480 python3 -m pipeline.bench experiment=e2e_decode 'bench.e2e.targets=[all7]' \
  'bench.e2e.batch_sizes=[1,8]' 'bench.e2e.engines=[graph]' bench.e2e.merge=true "bench.e2e.repeats=${E2E_REPEATS:-15}" \
  'bench.e2e.strategies=[base,peft,oracle+grouped,meteora-top2+grouped,dlp-nucleus2+grouped]'
step e2e_eager timeout 300 python3 -m pipeline.bench experiment=e2e_decode 'bench.e2e.targets=[all7]' \
  'bench.e2e.batch_sizes=[1]' 'bench.e2e.engines=[eager]' bench.e2e.merge=true bench.e2e.repeats=9 \
  'bench.e2e.strategies=[base,peft,oracle]'
step kernel_bench timeout 300 python3 -m kernels.bench --out /root/lmx/tables
step train_compiled_graph timeout 240 env TORCH_LOGS=recompiles python3 -m pipeline.bench \
  experiment=train_throughput bench.max_seconds=150 'bench.train.variants=[peft_single,loramux_gates]' \
  'bench.train.compiled=[true]' 'bench.train.compile_modes=[default]' 'bench.train.graphs=[true]' \
  bench.train.compiled_graph=true 'bench.train.batch_sizes=[64]' 'bench.train.extra_batch_sizes=[]' \
  bench.train.table_name=train_throughput_compiled_graph
for exp in "$@"; do reproduce "$exp"; done
echo DONE
