# Sourced on the node: the bundle's packages, offline hubs, the asset cache and outputs under /root/lmx.
export PYTHONPATH=/root/gpu-bundle/site${PYTHONPATH:+:$PYTHONPATH}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline TRANSFORMERS_NO_ADVISORY_WARNINGS=1
export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export LORAMUX_CACHE=/root/lmx/cache LORAMUX_OUTPUTS=/root/lmx
[ -f /root/lmx/sha ] && export LORAMUX_GIT_SHA=$(cat /root/lmx/sha)
true
