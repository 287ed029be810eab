#!/usr/bin/env bash
# speed_then.sh [<experiment> ...]: the speed issues' benchmarks (bench_steps.sh: train, e2e, e2e_eager, kernel_bench,
# ~20 minutes) on a quiet GPU, then the experiments given, one after another. A 30-minute session holds the
# benchmarks and perhaps a short experiment; the long paper tables need a session of their own. Where the node may
# be lost between calls, once.sh runs the same steps one call at a time instead.
source scripts/offline_gpu/chains/bench_steps.sh
train
e2e
e2e_eager
kernel_bench
for exp in "$@"; do reproduce "$exp"; done
echo DONE
