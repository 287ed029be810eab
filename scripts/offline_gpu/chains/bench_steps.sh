# Sourced by speed_then.sh and once.sh: the speed issues' benchmark steps, one function each, every one a `step`
# (its log in /root/lmx/logs/<name>.log, start / exit in chain.log) under its own time limit. Tables go to
# /root/lmx/tables; the e2e steps merge into the table found there (or, the first time, the committed one).
source scripts/offline_gpu/chains/common.sh
LMX=${LMX_ROOT:-/root/lmx}
mkdir -p "$LMX/tables" "$LMX/logs"
[ -f "$LMX/tables/e2e_decode.json" ] || cp outputs/tables/e2e_decode.json "$LMX/tables/"

# every training-throughput variant at batch 16 and 64 (the gates also at 256, their best batch at 9d88c5b), eager
# and compiled layers, each form as one captured step (their graphs share one memory pool, so a batch size's eight
# settings fit together), one table that decides every target (~7 minutes)
train() {
  step train timeout 550 python3 -m pipeline.bench experiment=train_throughput bench.max_seconds=360 \
    bench.train.repeats=9 'bench.train.variants=[peft_single,loramux_single,loramux_joint,loramux_gates]' \
    'bench.train.compiled=[false,true]' 'bench.train.compile_modes=[default]' 'bench.train.graphs=[true]' \
    bench.train.compiled_graph=true \
    'bench.train.batch_sizes=[16,64]' 'bench.train.extra_variants=[loramux_gates]' 'bench.train.extra_batch_sizes=[256]'
}
# compiled layers inside the whole-step graph beside eager layers captured, peft and the gates at batch 8 (the route
# stage's) and 64, 6 rounds, with dynamo's recompile log: at 412f547 the capture pass recompiled (the likely cause,
# an attention mask built only while capturing, is fixed at 31a1ecf: models.attention), ~5 minutes
train_compiled_graph() {
  step train_compiled_graph timeout "${STEP_LIMIT:-330}" env TORCH_LOGS=recompiles python3 -m pipeline.bench \
    experiment=train_throughput bench.train.repeats=6 'bench.train.variants=[peft_single,loramux_gates]' \
    'bench.train.compiled=[false,true]' 'bench.train.compile_modes=[default]' 'bench.train.graphs=[true]' \
    bench.train.compiled_graph=true 'bench.train.batch_sizes=[8,64]' 'bench.train.extra_batch_sizes=[]' \
    bench.train.table_name=train_throughput_compiled_graph
}
# the e2e decode targets: graph engine, the grouped strategies ($E2E_STRATEGIES, comma-separated), $E2E_REPEATS
# interleaved rounds (default 15), for each of $E2E_TARGETS (default all7) batch 1 then batch 8 ($E2E_BATCHES), each
# merged into the table (~100 s a call of 5 strategies); kept graphs unless E2E_KEEP=false (each call captures anew),
# E2E_WARM=true: the warm start (a record says which; the table's measured line names it). Under once.sh each call's
# table is packed as soon as it is written, so a call stopped at its limit brings back the calls before
# E2E_TARGETS is space-separated (one bench call per target): a comma is refused before anything runs
_e2e_targets() {
  case "${E2E_TARGETS:-all7}" in
    *,*) echo "E2E_TARGETS='$E2E_TARGETS': separate targets by spaces (E2E_TARGETS=\"all7 qv\")" >&2; return 2 ;;
  esac
}
e2e() {
  local b t
  _e2e_targets || return 2
  for t in ${E2E_TARGETS:-all7}; do
    for b in ${E2E_BATCHES:-1 8}; do
      step "e2e_${t}_b$b" timeout 270 python3 -m pipeline.bench experiment=e2e_decode "bench.e2e.targets=[$t]" \
        "bench.e2e.batch_sizes=[$b]" 'bench.e2e.engines=[graph]' bench.e2e.merge=true \
        "bench.e2e.repeats=${E2E_REPEATS:-15}" "bench.e2e.warm_start=${E2E_WARM:-false}" \
        "bench.e2e.keep_graph=${E2E_KEEP:-true}" \
        "bench.e2e.strategies=[${E2E_STRATEGIES:-base,peft,oracle+grouped,meteora-top2+grouped,dlp-nucleus2+grouped}]"
      if declare -F pack > /dev/null; then pack; fi
    done
  done
}
# the eager target (oracle <= peft, ungrouped and grouped), 9 rounds, for each of $E2E_TARGETS (default all7; qv:
# DLP-LoRA's q / v bank, e.g. E2E_EAGER_STRATEGIES=base,peft,dlp-nucleus2,dlp-nucleus2+grouped to time its grouping)
# at each of $E2E_EAGER_BATCHES (default 1 and 8), merged into the same table (~2-3 minutes a call)
e2e_eager() {
  local b t
  _e2e_targets || return 2
  for t in ${E2E_TARGETS:-all7}; do
    for b in ${E2E_EAGER_BATCHES:-1 8}; do
      step "e2e_eager_${t}_b$b" timeout 330 python3 -m pipeline.bench experiment=e2e_decode "bench.e2e.targets=[$t]" \
        "bench.e2e.batch_sizes=[$b]" 'bench.e2e.engines=[eager]' bench.e2e.merge=true bench.e2e.repeats=9 \
        "bench.e2e.strategies=[${E2E_EAGER_STRATEGIES:-base,peft,oracle,oracle+grouped}]"
      if declare -F pack > /dev/null; then pack; fi
    done
  done
}
# the op micro-benchmark at this commit (~2 minutes)
kernel_bench() { step kernel_bench timeout 300 python3 -m kernels.bench --out "$LMX/tables"; }
# DLP-LoRA's latency table (decode against the number of adapters; random-weight shapes, so no asset), with its
# report and raw records under /root/lmx/{tables,records} (bench.max_seconds 420: ~8.5 minutes, a call of its own)
# DLP_LATENCY_ARGS: space-separated overrides (e.g. bench.max_seconds=300 where less device time is left)
dlp_latency() {
  # shellcheck disable=SC2086  # one override per word
  step dlp_latency timeout 575 python3 -m pipeline.reproduce experiment=dlp_latency logger=csv ${DLP_LATENCY_ARGS:-}
}
# the gates' tokens/s target alone (an absolute rate, no ratio): compiled layers at batch 256, their best batch at
# 9d88c5b, 6 rounds, its own table (~1.5 minutes)
train_gates_compiled() {
  step train_gates_compiled timeout "${STEP_LIMIT:-170}" python3 -m pipeline.bench experiment=train_throughput \
    bench.train.repeats=6 'bench.train.variants=[loramux_gates]' 'bench.train.compiled=[true]' \
    'bench.train.compile_modes=[default]' 'bench.train.graphs=[false]' 'bench.train.batch_sizes=[256]' \
    'bench.train.extra_batch_sizes=[]' bench.train.table_name=train_throughput_gates_compiled
}
# bf16 against fp32 for every variant (the whole step captured, batch 64, 6 rounds), its own table (~2 minutes)
train_precision() {
  step train_precision timeout "${STEP_LIMIT:-240}" python3 -m pipeline.bench experiment=train_throughput \
    bench.train.repeats=6 'bench.train.precisions=[bf16,fp32]' 'bench.train.compiled=[false]' \
    'bench.train.graphs=[true]' 'bench.train.batch_sizes=[64]' 'bench.train.extra_batch_sizes=[]' \
    bench.train.table_name=train_throughput_precision
}
# every variant with compiled layers inside the captured step (the fastest form of peft at 2d94ff0: 282k tokens/s at
# batch 64, twice its eager captured step), batch 16 and 64, 6 rounds, its own table (~2.5 minutes)
train_compiled_graph_all() {
  step train_compiled_graph_all timeout "${STEP_LIMIT:-300}" python3 -m pipeline.bench experiment=train_throughput \
    bench.train.repeats=6 'bench.train.compiled=[true]' 'bench.train.compile_modes=[default]' \
    'bench.train.graphs=[true]' bench.train.compiled_graph=true 'bench.train.batch_sizes=[16,64]' \
    'bench.train.extra_batch_sizes=[]' bench.train.table_name=train_throughput_compiled_graph_all
}
# bf16 against fp32 for the routed variants alone, batch 64, 6 rounds, table train_throughput_precision_$ROUTED_TABLE
# (~1.5 minutes). At 7d91b3e train_precision ran out of memory after peft and loramux_single (each captured setting
# then held its own graph pool); since the settings share one pool this step is for re-running some variants alone.
train_precision_routed() {
  step train_precision_routed timeout "${STEP_LIMIT:-240}" python3 -m pipeline.bench experiment=train_throughput \
    bench.train.repeats=6 "bench.train.variants=[${ROUTED_VARIANTS:-loramux_joint,loramux_gates}]" \
    'bench.train.precisions=[bf16,fp32]' \
    'bench.train.compiled=[false]' 'bench.train.graphs=[true]' 'bench.train.batch_sizes=[64]' \
    'bench.train.extra_batch_sizes=[]' "bench.train.table_name=train_throughput_precision_${ROUTED_TABLE:-routed}"
}
# the GPU tests of what a benchmark step relies on ($GPU_TESTS: files or node ids; default the captured training
# steps, a shared graph pool among them, and the route stage's captured step), their report in the log (~2 minutes)
gpu_tests() {
  # shellcheck disable=SC2086
  step gpu_tests timeout "${STEP_LIMIT:-480}" python3 -m pytest -q -m gpu -p no:cacheprovider \
    ${GPU_TESTS:-tests/test_bench_train.py tests/test_route_graph.py}
}
# where a variant's time goes beside peft's (compiled layers captured, batch $PROFILE_BATCH, default 16): one step of
# each of $PROFILE_VARIANTS (default peft_single,loramux_single) profiled (kernels by self device time,
# profile_*.txt beside the run's metrics.json), 3 rounds, table train_throughput_profile (~1.5 minutes). At 0df74f3 it
# found loramux_single's device copy per projection (addmm's copy of the base output)
train_profile() {
  local vs=${PROFILE_VARIANTS:-peft_single,loramux_single} b=${PROFILE_BATCH:-16} v labels=()
  for v in ${vs//,/ }; do labels+=("$v/bf16/compiled/graph/b$b"); done
  step train_profile timeout "${STEP_LIMIT:-200}" python3 -m pipeline.bench experiment=train_throughput \
    bench.train.repeats=3 "bench.train.variants=[$vs]" 'bench.train.compiled=[true]' \
    'bench.train.compile_modes=[default]' 'bench.train.graphs=[true]' bench.train.compiled_graph=true \
    "bench.train.batch_sizes=[$b]" 'bench.train.extra_batch_sizes=[]' \
    "bench.train.profile=[$(IFS=,; echo "${labels[*]}")]" bench.train.table_name=train_throughput_profile
}
# the gates' forms (kernels.packed_gate: shrink + gate logits in one GEMM; that GEMM with the base weight too; the
# router's default, the three apart) beside peft and loramux_single, compiled layers captured, batch 64, 5 rounds,
# table train_throughput_packed (~2.5 minutes; at 7601e65: apart 0.763x peft, shrink+gate 0.748x, all three 0.721x,
# loramux_single 1.008x; one run at 98d18e4 had shrink+gate at 0.804x)
train_packed() {
  gate_forms train_packed loramux_gates_packed,loramux_gates_packed_lora,loramux_gates,peft_single,loramux_single
}
# gate_forms <step> <variants>: the variants, compiled layers captured, batch 64, 5 rounds, table
# train_throughput_<step without its train_ prefix>. A helper of the steps, not one: declared as `function`, which
# once.sh does not list among the steps (it lists `name() {` lines)
function gate_forms {
  step "$1" timeout "${STEP_LIMIT:-240}" python3 -m pipeline.bench experiment=train_throughput \
    bench.train.repeats=5 "bench.train.variants=[$2]" \
    'bench.train.compiled=[true]' 'bench.train.compile_modes=[default]' 'bench.train.graphs=[true]' \
    bench.train.compiled_graph=true 'bench.train.batch_sizes=[64]' 'bench.train.extra_batch_sizes=[]' \
    "bench.train.table_name=train_throughput_${1#train_}"
}
# one graph-engine call per strategy profiled at batch 8 after 3 short rounds (profile_e2e_*_b8.txt in the run dir:
# host and device time of each phase, ops by device and CPU time): where the eager first step and the capture, paid
# once a call, go for the base beside the grouped DLP and oracle. Its table goes apart ($LMX/e2e_profile), not into
# the e2e table (~2 minutes)
e2e_profile() {
  step e2e_profile timeout 240 python3 -m pipeline.bench experiment=e2e_decode 'bench.e2e.targets=[all7]' \
    'bench.e2e.batch_sizes=[8]' 'bench.e2e.engines=[graph]' bench.e2e.repeats=3 bench.e2e.split_calls=1 \
    'bench.e2e.strategies=[base,oracle+grouped,dlp-nucleus2+grouped]' \
    'bench.e2e.profile_calls=[base,oracle+grouped,dlp-nucleus2+grouped]' "bench.table_dir=$LMX/e2e_profile"
}
# the gates' route fused (kernels.gate_mix: top-k, multiply and CE one Triton kernel each way, the router's default on
# CUDA) beside the coefficient matrix torch.compile makes kernels of (loramux_gates_unfused), the shrink+gate packed
# form, peft and loramux_single, compiled layers captured, batch 64, 5 rounds, table train_throughput_fused
train_fused() {
  gate_forms train_fused loramux_gates_unfused,loramux_gates,loramux_gates_packed_lora,peft_single,loramux_single
}
# inductor's autotuned Triton GEMMs with their pointwise neighbours fused into the epilogue
# (max-autotune-no-cudagraphs) beside the default compile, both captured, peft / loramux_single / the gates at batch
# 64, 6 rounds, table train_throughput_autotune (the autotuning adds minutes to the warm-up: not yet timed)
train_autotune() {
  step train_autotune timeout "${STEP_LIMIT:-540}" python3 -m pipeline.bench experiment=train_throughput \
    bench.max_seconds=420 bench.train.repeats=6 "bench.train.variants=[${AUTOTUNE_VARIANTS:-peft_single,loramux_single,loramux_gates}]" \
    'bench.train.compiled=[true]' 'bench.train.compile_modes=[default,max-autotune-no-cudagraphs]' \
    'bench.train.graphs=[true]' bench.train.compiled_graph=true 'bench.train.batch_sizes=[64]' \
    'bench.train.extra_batch_sizes=[]' bench.train.table_name=train_throughput_autotune
}
