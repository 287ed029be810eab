"""Rows of the task registry for training: one task, or the LoRA-B mix of all of them.

``data.tasks.load_split(task, split)`` gives a ``datasets.Dataset`` with ``prompt`` and ``answer`` columns.
``LORA_B`` names MeteoRA's LoRA-B baseline: one adapter trained on every task of the experiment at once,
at most ``cap`` rows per task (the paper uses 1000), shuffled together with the run's seed.
"""

from __future__ import annotations

import random

LORA_B = "lora_b"


def _limit(rows, limit):
    return rows if limit is None else rows[: int(limit)]


def task_rows(task: str, split: str, limit: int | None = None) -> list[dict]:
    """``[{"prompt", "answer", "task"}]`` of one task's split, the first ``limit`` rows."""
    from data.tasks import load_split

    ds = load_split(task, split)
    n = len(ds) if limit is None else min(len(ds), int(limit))
    ds = ds.select(range(n))
    return [{"prompt": r["prompt"], "answer": r["answer"], "task": task} for r in ds]


def mixed_rows(tasks, split: str, cap: int, seed: int, limit: int | None = None) -> list[dict]:
    """LoRA-B rows: up to ``cap`` rows of each task (first rows), shuffled together; then the first ``limit``."""
    rows = []
    for task in tasks:
        rows += task_rows(task, split, cap)
    random.Random(seed).shuffle(rows)
    return _limit(rows, limit)


def rows_for(task: str, tasks, split: str, data_cfg, seed: int, limit: int | None) -> list[dict]:
    """Rows a finetune run trains on: ``task``'s own, or the LoRA-B mix of ``tasks`` when task == lora_b."""
    if task == LORA_B:
        if not tasks:
            raise ValueError("task=lora_b mixes the experiment's `tasks`, which is empty; pick an experiment "
                             "(experiment=demo) or set tasks=[a,b]")
        return mixed_rows(tasks, split, int(data_cfg.mix_cap_per_task), seed, limit)
    return task_rows(task, split, limit)
