#!/usr/bin/env bash
# Here, before a GPU session: dry_run.sh <experiment> [overrides...] runs the experiment's whole reproduce plan on the
# CPU with the tiny random LLaMA, 2 training steps and 2-4 rows, into $DRY_ROOT (default: a fresh /tmp/lmx-dry.XXXX
# each time; a root that holds an earlier dry run would have reproduce skip its finished steps), so a step that
# crashes (a config that does not compose, a stage that fails on the experiment's settings, a report that cannot
# build its table) is found before a GPU session spends its minutes on it. It found head_to_head's bench step
# measuring nothing (fixed at d01807f). A plan entry's own budget (a route step's "+trainer.max_time",
# "router.train.steps=7000") wins over these; bound it with an override of the entry, e.g.
# 'plan.route.meteora=["router.train.steps=2"]'.
# Exit status: reproduce's.
set -uo pipefail
exp=${1:-}; shift || true
[ -n "$exp" ] || { echo "dry_run.sh: name the experiment first (conf/experiment/<name>.yaml)" >&2; exit 2; }
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline
if ! python -c "from data.assets import real_bigbench; raise SystemExit(not real_bigbench())"; then
  # no BIG-bench here (its sdist left the index): the plumbing runs on generated stand-in task files (data/standin.py)
  LORAMUX_CACHE=$(python -m data.standin) || exit 2
  export LORAMUX_CACHE
  echo "dry_run.sh: BIG-bench absent: task files are the generated stand-in at $LORAMUX_CACHE"
fi
root=${DRY_ROOT:-$(mktemp -d /tmp/lmx-dry.XXXX)}
echo "dry_run.sh: $exp into $root"
python -m pipeline.reproduce "experiment=$exp" model=tiny logger=none "paths.output_root=$root" \
  allow_dirty=true ++trainer.max_steps=2 ++trainer.val_check_interval=2 ++data.train_limit=4 ++data.val_limit=2 \
  ++data.test_limit=4 ++data.max_length=64 ++composite_rows=2 ++generation.max_new_tokens=4 \
  ++generation.composite_max_new_tokens_per_task=4 ++router.train.steps=2 ++router.train.rows_per_task=2 \
  ++optim.batch_size=2 "$@"
