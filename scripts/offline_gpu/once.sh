#!/usr/bin/env bash
# On the node, from the repo root, carrying .gpubench (pack_bench.sh): once.sh <full git sha> <step> [<step> ...]
# Runs benchmark steps (the functions of chains/bench_steps.sh: train, e2e, gpu_tests, ...) in the
# foreground of this one call and packs /root/lmx into $OUT/lmx.tgz. The benchmarks build their models from shapes
# with random weights, so they need the wheels and this tree only: each call stands alone, and a node lost between
# two calls costs its restart (~1.5 minutes), not a chain. Keep one call's steps inside the 600 s a call may run.
set -uo pipefail
sha=${1:-}; shift || true
[[ $sha =~ ^[0-9a-f]{40}$ ]] || { echo "once.sh: give the full 40-hex git sha of this tree first" >&2; exit 2; }
steps=$(sed -n 's/^\([a-z0-9][a-z0-9_]*\)() {.*/\1/p' scripts/offline_gpu/chains/bench_steps.sh | tr '\n' ' ')
(( $# )) || { echo "once.sh: name the steps to run (${steps% })" >&2; exit 2; }
bash .gpubench/install.sh | tail -1
mkdir -p /root/lmx/logs && echo "$sha" > /root/lmx/sha
source scripts/offline_gpu/chains/bench_steps.sh
for s in "$@"; do
  declare -F "$s" > /dev/null || { echo "once.sh: no step '$s' in chains/bench_steps.sh" >&2; exit 2; }
done
pack() { (cd /root/lmx && tar czf "$OUT/lmx.tgz.part" --exclude=./cache --exclude=./src --exclude=wandb . &&
          mv "$OUT/lmx.tgz.part" "$OUT/lmx.tgz"); }
# packed after every step: a call stopped at its time limit still brings back the steps it finished
for s in "$@"; do "$s" >> /root/lmx/chain.log 2>&1; pack; done
tail -n 8 /root/lmx/chain.log
for f in /root/lmx/logs/*.log; do [ -f "$f" ] && { echo "== $f"; tail -n 2 "$f"; }; done
ls "$OUT"
