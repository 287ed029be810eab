"""Rows of the task registry for training: one task, or the LoRA-B mix of all of them.

``data.tasks.load_split(task, split, seed=, max_<split>=)`` gives a ``datasets.Dataset`` with ``prompt`` and
``answer`` columns (a cap takes a prefix, so a smaller cap is a subset of a larger one). ``LORA_B`` names
MeteoRA's LoRA-B baseline: one adapter trained on every task of the experiment at once, at most ``cap`` rows per
task (the paper uses 1000), shuffled together with the run's seed. ``JOINT_TASK`` (``finetune task=all``) is no
task either: it trains every task's own adapter in one run (the finetune stage's joint mode).
"""

from __future__ import annotations

import random

from data.tasks import load_split

LORA_B = "lora_b"
JOINT_TASK = "all"  # finetune task=all: every task of `tasks` in one run


def task_rows(task: str, split: str, limit: int | None = None, split_seed: int = 0) -> list[dict]:
    """``[{"prompt", "answer", "choices", "task"}]`` of one task's split, the first ``limit`` rows."""
    caps = {f"max_{split}": None if limit is None else int(limit)}
    ds = load_split(task, split, seed=int(split_seed), **caps)
    return [{"prompt": r["prompt"], "answer": r["answer"], "choices": list(r["choices"]), "task": task} for r in ds]


def mixed_rows(tasks, split: str, cap: int, seed: int, limit: int | None = None, split_seed: int = 0) -> list[dict]:
    """LoRA-B rows: up to ``cap`` rows of each task (first rows), shuffled together; then the first ``limit``."""
    rows = []
    for task in tasks:
        rows += task_rows(task, split, cap, split_seed)
    random.Random(seed).shuffle(rows)
    return rows if limit is None else rows[: int(limit)]


def rows_for(task: str, tasks, split: str, data_cfg, seed: int, limit: int | None) -> list[dict]:
    """Rows a finetune run trains on: ``task``'s own, or the LoRA-B mix of ``tasks`` when task == lora_b."""
    split_seed = int(data_cfg.split_seed)
    if task == LORA_B:
        if not tasks:
            raise ValueError("task=lora_b mixes the experiment's `tasks`, which is empty; pick an experiment "
                             "(experiment=demo) or set tasks=[a,b]")
        return mixed_rows(tasks, split, int(data_cfg.mix_cap_per_task), seed, limit, split_seed)
    return task_rows(task, split, limit, split_seed)
