"""Task registry API: look tasks up, name selections, and load deterministic train/val/test splits.

    from data.tasks import get_task, select, load_split, task_id
    ds = load_split("strategyqa", "test", seed=0, max_test=200)   # datasets.Dataset: task, prompt, answer, choices
    names = select("composite3")                                  # ('logical_deduction', 'question_selection', ...)

The table itself is data/task_table.py (one source of truth). Splits: rows are permuted with
`numpy.random.default_rng(seed)`; where the data has no test split (every BIG-bench task, alpaca, news_commentary)
the first 20% of the permutation is the test set (MeteoRA's 80/20), then 10% of the rest is validation, the
remainder training: strategyqa's 2289 distinct rows give 1648/183/458 (MeteoRA: 1832 train / 457 test).
Caps (`max_train` ...) take the first rows of each part, so a smaller cap is always a prefix of a larger one.
Prompts: `template.format(inputs=...)` around the inputs as BIG-bench formats them (choices included where its
task file appends them, data/bigbench.py); the four tasks MeteoRA appends choices to itself (a `choice_lead`:
logical_deduction, abstract_narrative_understanding, tracking_shuffled_objects, unit_conversion) get `choice_lead`
+ one `choice: X` line per choice (MeteoRA's format); the other MCQ tasks whose files append none
(winowhy, formal_fallacies, ...) show no choices, as in MeteoRA.

HF tasks read the hub when `use_hub()` (LORAMUX_USE_HUB=1, or "auto" with HF_DATASETS_OFFLINE unset and
huggingface.co reachable); otherwise their named BIG-bench substitute, which `data_source()` reports.

`python -m data.tasks [--selection meteora28]` prints one line per task with its source, kind, metrics and counts.
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Sequence
from functools import lru_cache

import numpy as np

from common.cli_args import ArgumentParser, user_error
from data.bigbench import bigbench_rows
from data.errors import LoramuxDataError
from data.hf_sources import load_hf_rows
from data.task_table import METEORA28, SELECTIONS, TASKS, Task, get_task, select

SPLITS = ("train", "val", "test")
TEST_FRACTION = 0.2
VAL_FRACTION = 0.1
COLUMNS = ("task", "prompt", "answer", "choices")


# ----------------------------------------------------------------------------------------------- lookup
def task_id(name: str, selection: str | Sequence[str] = "meteora28") -> int:
    """Stable integer id of a task inside a selection (its position), for router labels and adapter slots."""
    names = select(selection)
    get_task(name)
    if name not in names:
        raise LoramuxDataError(f"task {name!r} is not in selection {selection!r}; pick a selection that holds it")
    return names.index(name)


# ----------------------------------------------------------------------------------------------- sources
@lru_cache(maxsize=1)
def _hub_reachable() -> bool:
    try:
        socket.create_connection(("huggingface.co", 443), timeout=2).close()
        return True
    except OSError:
        return False


def use_hub() -> bool:
    """Whether HF tasks load their real data set (LORAMUX_USE_HUB=1/0 forces; default: offline flags, then probe)."""
    mode = os.environ.get("LORAMUX_USE_HUB", "auto").lower()
    if mode in ("1", "true", "yes"):
        return True
    if mode in ("0", "false", "no"):
        return False
    offline = any(os.environ.get(v, "").lower() in ("1", "true", "yes") for v in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"))
    return not offline and _hub_reachable()


def data_source(task: str | Task, hub: bool | None = None) -> str:
    """What a task's rows come from right now: 'bigbench', 'hf:<path>' or 'substitute-for <name>: <bigbench>'."""
    task = get_task(task)
    if task.source == "bigbench":
        return "bigbench"
    if use_hub() if hub is None else hub:
        return f"hf:{task.hf.path}" + (f"/{task.hf.name}" if task.hf.name else "")
    return f"substitute-for {task.name}: {task.substitute}"


def _build_prompt(task: Task, template: str, row: dict) -> str:
    """The task template around the BIG-bench inputs; MeteoRA's own choice lines where it appends them (the four
    tasks with a `choice_lead`, whose BIG-bench files append none)."""
    inputs = row["inputs"]
    if row["choices"] and not row.get("appended") and task.choice_lead is not None:
        inputs = inputs + task.choice_lead + "".join(f"choice: {c}\n" for c in row["choices"])
    return template.format(inputs=inputs)


def _dedupe(rows: list[dict], seen: set | None = None) -> list[dict]:
    """Rows whose (inputs, choices) were not seen before: a question asked twice must not sit in train and test."""
    seen = set() if seen is None else seen
    out = []
    for r in rows:
        key = (r["inputs"], tuple(r["choices"]))
        if key not in seen:
            seen.add(key)
            out.append(r)
    return out


def _pools(task: Task, hub: bool, hf_data_files: dict | None) -> tuple[list[dict], list[dict] | None, str]:
    """(train pool, test pool or None, template) for a task from its current source, duplicates dropped.

    A few BIG-bench tasks repeat a question (strategyqa 1 of 2290, elementary_math_qa 280 of 38440): only the
    first copy is kept, so the splits never share a prompt (strategyqa: 2289 rows, MeteoRA's 1832 + 457).
    """
    if task.source == "hf" and (hub or hf_data_files):
        rows = load_hf_rows(task.hf, data_files=hf_data_files)
        test = rows.get("test")
        if test is None:
            return _dedupe(rows["train"]), None, task.hf.template
        seen: set = set()
        test = _dedupe(test, seen)
        return _dedupe(rows["train"], seen), test, task.hf.template
    rows = bigbench_rows(task.bigbench, task.bigbench_filter, mcq=task.kind == "mcq")
    return _dedupe(rows), None, task.template


# ----------------------------------------------------------------------------------------------- splits
def split_indices(n_train_pool: int, n_test_pool: int | None, seed: int) -> dict[str, np.ndarray]:
    """Deterministic indices of each split. With no test pool, test is carved from the train pool first."""
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n_train_pool)
    if n_test_pool is None:
        n_test = round(TEST_FRACTION * n_train_pool)
        test, rest = perm[:n_test], perm[n_test:]
    else:
        test, rest = rng.permutation(n_test_pool), perm
    n_val = round(VAL_FRACTION * len(rest))
    return {"test": test, "val": rest[:n_val], "train": rest[n_val:]}


def _caps(max_train, max_val, max_test) -> dict[str, int | None]:
    return {"train": max_train, "val": max_val, "test": max_test}


def split_sizes(task: str | Task, *, seed: int = 0, max_train=None, max_val=None, max_test=None,
                hub: bool | None = None) -> dict[str, int]:
    """Row counts of train/val/test after caps (reads the data, builds no Dataset)."""
    task = get_task(task)
    train_pool, test_pool, _ = _pools(task, use_hub() if hub is None else hub, None)
    idx = split_indices(len(train_pool), None if test_pool is None else len(test_pool), seed)
    caps = _caps(max_train, max_val, max_test)
    return {s: len(idx[s]) if caps[s] is None else min(caps[s], len(idx[s])) for s in SPLITS}


def load_split(
    task: str | Task,
    split: str,
    *,
    seed: int = 0,
    max_train: int | None = None,
    max_val: int | None = None,
    max_test: int | None = None,
    hub: bool | None = None,
    hf_data_files: dict[str, str] | None = None,
):
    """One split of one task as a `datasets.Dataset` with columns task, prompt, answer (str), choices (list[str]).

    hub: force (True) or forbid (False) the real HF data set for HF tasks (default: `use_hub()`);
    hf_data_files: {"train": path, "test": path} json/parquet files in the HF data set's own layout, loaded
    through `load_dataset` like the hub copy (tests, local mirrors).
    """
    from datasets import Dataset, Features, Sequence, Value  # lazy: slow to import; listing tasks needs none

    task = get_task(task)
    if split not in SPLITS:
        raise LoramuxDataError(f"unknown split {split!r} for task {task.name}; use one of {', '.join(SPLITS)}")
    train_pool, test_pool, template = _pools(task, use_hub() if hub is None else hub, hf_data_files)
    idx = split_indices(len(train_pool), None if test_pool is None else len(test_pool), seed)[split]
    cap = _caps(max_train, max_val, max_test)[split]
    if cap is not None:
        idx = idx[:cap]
    if len(idx) == 0:
        raise LoramuxDataError(
            f"split {split!r} of task {task.name} is empty ({len(train_pool)} rows in its data, cap {cap}); "
            f"raise max_{split} or check the task's data with `python -m data.tasks`"
        )
    pool = test_pool if (split == "test" and test_pool is not None) else train_pool
    rows = [pool[int(i)] for i in idx]
    features = Features({"task": Value("string"), "prompt": Value("string"), "answer": Value("string"),
                         "choices": Sequence(Value("string"))})
    return Dataset.from_dict(
        {
            "task": [task.name] * len(rows),
            "prompt": [_build_prompt(task, template, r) for r in rows],
            "answer": [r["answer"] for r in rows],
            "choices": [list(r["choices"]) for r in rows],
        },
        features=features,
    )


def task_pool(task: str | Task, hub: bool | None = None) -> list[dict]:
    """Every row of a task's current source, all splits, duplicates dropped, with its prompt built:
    ``[{"prompt", "answer", "choices", "inputs"}]`` (where fixed examples are looked up)."""
    task = get_task(task)
    train_pool, test_pool, template = _pools(task, use_hub() if hub is None else hub, None)
    return [{"prompt": _build_prompt(task, template, r), "answer": r["answer"], "choices": list(r["choices"]),
             "inputs": r["inputs"]} for r in train_pool + (test_pool or [])]


# ----------------------------------------------------------------------------------------------- CLI
def describe(task: Task, sizes: dict[str, int] | None, hub: bool) -> str:
    counts = "counts: n/a" if sizes is None else " ".join(f"{s}={sizes[s]}" for s in SPLITS)
    return f"{task.name:42s} {data_source(task, hub):62s} {task.kind:3s} {'+'.join(task.metrics):34s} {counts}"


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m data.tasks", description="List the registered tasks.")
    parser.add_argument("--selection", default="meteora28", help=f"one of {', '.join(SELECTIONS)} or task names")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-train", type=int)
    parser.add_argument("--max-val", type=int)
    parser.add_argument("--max-test", type=int)
    args = parser.parse_args(argv)
    try:
        names = select(args.selection)
    except LoramuxDataError as err:
        return user_error(err)
    hub = use_hub()
    status = 0
    for name in names:
        task = get_task(name)
        try:
            sizes = split_sizes(task, seed=args.seed, max_train=args.max_train, max_val=args.max_val,
                                max_test=args.max_test, hub=hub)
            print(describe(task, sizes, hub))
        except LoramuxDataError as err:
            print(describe(task, None, hub) + f"  [{err}]")
            status = 1
    print(f"{len(names)} tasks ({args.selection}); seed {args.seed}")
    return status


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["METEORA28", "TASKS", "Task", "data_source", "get_task", "load_split", "select", "split_sizes", "task_id",
           "task_pool"]
