#!/usr/bin/env bash
# On the node: poll.sh [seconds]: wait until the chain prints DONE or the seconds pass, print progress, and pack
# /root/lmx (all but the cache, the code snapshot, weights and checkpoints) into $OUT/lmx.tgz.
limit=${1:-540} t0=$SECONDS
# a fresh node (the held one was released between two calls) has no chain: say so at once, spend no device time
[ -f /root/lmx/chain.log ] || { echo "poll.sh: no chain on this node (a fresh node: the last one was released); start it again" >&2; exit 3; }
while (( SECONDS - t0 < limit )) && ! grep -q '^DONE' /root/lmx/chain.log 2>/dev/null; do sleep 10; done
tail -n 25 /root/lmx/chain.log
nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader 2>/dev/null
nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader 2>/dev/null
for f in /root/lmx/logs/*.log; do [ -f "$f" ] && { echo "== $f"; tail -n 4 "$f"; }; done
cd /root/lmx && tar czf "$OUT/lmx.tgz" --exclude=./cache --exclude=./src --exclude='*.ckpt' --exclude='*.pt' \
  --exclude='*.safetensors' --exclude='*.bin' --exclude=wandb . && ls -la "$OUT"
