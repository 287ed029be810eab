#!/usr/bin/env bash
# On the node, from the repo root: start.sh <full git sha> <chain> [chain args...]
# Fills the asset cache (BIG-bench from .gpubb, SmolLM2 from the bundle's GGUF, Gemma-3-270M where pack_gemma.sh's
# folders were installed), snapshots this tree to
# /root/lmx/src, and runs chains/<chain>.sh there in the background (log: /root/lmx/chain.log).
set -euo pipefail
sha=$1 chain=$2; shift 2
[[ $sha =~ ^[0-9a-f]{40}$ ]] || { echo "start.sh: give the full 40-hex git sha of this tree" >&2; exit 2; }
# a chain still running on this node: refused (two chains would share the GPU, and its code snapshot is replaced)
if [ -f /root/lmx/chain.pid ] && kill -0 "$(cat /root/lmx/chain.pid)" 2>/dev/null; then
  echo "start.sh: a chain is still running (pid $(cat /root/lmx/chain.pid)); poll it, or kill it first" >&2; exit 2
fi
mkdir -p /root/lmx/cache /root/lmx/logs && echo "$sha" > /root/lmx/sha
source scripts/offline_gpu/env.sh
[ -f /root/lmx/cache/bigbench/MANIFEST.json ] || tar xzf .gpubb/bb.tgz -C /root/lmx/cache
python3 -m data.fetch --model --gguf /root/gpu-bundle/SmolLM2-135M-Instruct.Q4_1.gguf | tail -2
gemma=/root/gpu-bundle/gemma/gemma-3-270m-q4_k_m.gguf   # the second backbone, where pack_gemma.sh's folders came
[ -f "$gemma" ] && python3 -m data.fetch --gemma-gguf "$gemma" | tail -1
rm -rf /root/lmx/src && mkdir /root/lmx/src && cp -r . /root/lmx/src/ && rm -rf /root/lmx/src/.gpu*
cd /root/lmx/src
# a chain started before on this node that has ended (one that failed at once, say): its log kept apart, as its DONE
# would end the next poll.sh at once
[ -f /root/lmx/chain.log ] && mv /root/lmx/chain.log "/root/lmx/chain.before-$(date +%s).log"
# setsid: the chain outlives the call that started it (a call ends by killing its process group)
setsid nohup bash "scripts/offline_gpu/chains/$chain.sh" "$@" >> /root/lmx/chain.log 2>&1 < /dev/null &
echo $! > /root/lmx/chain.pid
sleep 5; cat /root/lmx/chain.log
