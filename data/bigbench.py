"""Read BIG-bench `task.json` files from the cache into (inputs, answer, choices) rows.

A BIG-bench JSON task is a header (`task_prefix`, `example_input_prefix`, `example_output_prefix`) plus
`examples`, each with `input` and either `target` (free text; a string or a list, the first counts) or
`target_scores` (multiple choice: {choice: score}). A task with subtasks keeps one task.json per subtask dir;
we merge them in sorted dir order, as MeteoRA's HF `bigbench` configs do.

`inputs` is built the way BIG-bench formats a zero-shot query (its json_task `default_format_fn`, what HF
`bigbench`'s `inputs` column and so MeteoRA's prompts hold): task_prefix + input_prefix + input [+ choices] +
output_prefix, with BIG-bench's defaults "\\nQ: " / "\\nA: " where a task sets none, stripped. A multiple-choice
example gets its choices appended before the output prefix when the task file's `append_choices_to_input` is
truthy (default true; BIG-bench tests truthiness, so contextual_parametric_knowledge_conflicts' string "false"
appends), each after `choice_prefix` (default "\\n  choice: "), in BIG-bench's order: a permutation of the sorted
choices by `numpy.random.RandomState(42)`, one draw per distinct example in file order. (HF's dump permuted with
a stream we could not reproduce, so MeteoRA's rows can list the same choices in another order.) Where BIG-bench
appends none (winowhy, logical_deduction, ...), `choices` keeps them in file order and the task's prompt builder
appends MeteoRA's own choice lines if MeteoRA does (data/task_table.py `choice_lead`).
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import numpy as np

from data.assets import bigbench_dir
from data.errors import LoramuxDataError

DEFAULT_INPUT_PREFIX = "\nQ: "
DEFAULT_OUTPUT_PREFIX = "\nA: "
DEFAULT_CHOICE_PREFIX = "\n  choice: "
CHOICE_SEED = 42
FIX = "re-extract with `python -m data.fetch --bigbench --force`"


def task_files(root: Path, task_dir: str) -> list[Path]:
    """The task.json files holding examples for one BIG-bench dir: its own, else its subtasks' (sorted)."""
    base = root / task_dir
    own = base / "task.json"
    subs = sorted(base.glob("*/task.json"))
    if not own.is_file() and not subs:
        raise LoramuxDataError(
            f"BIG-bench data for {task_dir!r} is missing under {root}; run `python -m data.fetch --bigbench`"
        )
    return subs if subs else [own]


def _load_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (ValueError, UnicodeDecodeError) as err:
        raise LoramuxDataError(f"malformed BIG-bench file {path}: {err}; {FIX}") from err
    if not isinstance(data, dict):
        raise LoramuxDataError(f"malformed BIG-bench file {path}: top level is not an object; {FIX}")
    return data


def _first(target) -> str:
    if isinstance(target, list):
        return str(target[0]) if target else ""
    return str(target)


def read_rows(path: Path, comment_prefix: str | None = None, mcq: bool = True) -> list[dict]:
    """Rows {inputs, answer, choices, appended} of one task.json; examples whose `comment` lacks the prefix are
    skipped (after the choice permutation, which every distinct example draws, as in BIG-bench).

    mcq=True: an example with target_scores becomes a choice row (answer = the best-scored choice).
    mcq=False (QA tasks such as strategyqa, whose JSON has both): the free-text `target` is the answer, no choices.
    appended: whether BIG-bench put the choices into `inputs` already.
    """
    data = _load_json(path)
    examples = data.get("examples")
    if not isinstance(examples, list):
        raise LoramuxDataError(f"malformed BIG-bench file {path}: no 'examples' list; {FIX}")
    prefix = data.get("task_prefix") or ""
    in_pre = data.get("example_input_prefix")
    out_pre = data.get("example_output_prefix")
    in_pre = DEFAULT_INPUT_PREFIX if in_pre is None else in_pre
    out_pre = DEFAULT_OUTPUT_PREFIX if out_pre is None else out_pre
    choice_pre = data.get("choice_prefix")
    choice_pre = DEFAULT_CHOICE_PREFIX if choice_pre is None else choice_pre
    append = bool(data.get("append_choices_to_input", True))
    rng, orders = np.random.RandomState(CHOICE_SEED), {}  # one draw per distinct example (BIG-bench dedupes first)
    rows = []
    for i, ex in enumerate(examples):
        if not isinstance(ex, dict) or "input" not in ex or not ("target" in ex or "target_scores" in ex):
            raise LoramuxDataError(
                f"malformed BIG-bench file {path}: example {i} lacks 'input' or a 'target'/'target_scores'; {FIX}"
            )
        scores = ex.get("target_scores")
        key = json.dumps(ex)
        if key not in orders:
            orders[key] = ([str(c) for c in rng.permutation(sorted(scores))]
                           if append and isinstance(scores, dict) and scores else None)
        if comment_prefix is not None and not str(ex.get("comment", "")).startswith(comment_prefix):
            continue
        if isinstance(scores, dict) and scores and (mcq or "target" not in ex):
            choices = [str(c) for c in scores]
            best = max(scores.values())
            answer = next(str(c) for c, s in scores.items() if s == best)
        else:
            choices, answer = [], _first(ex.get("target"))
        body = str(ex["input"])
        appended = bool(choices) and orders[key] is not None
        if appended:
            body += choice_pre + choice_pre.join(orders[key])
        inputs = (prefix + in_pre + body + out_pre).strip()
        rows.append({"inputs": inputs, "answer": answer, "choices": choices, "appended": appended})
    return rows


@lru_cache(maxsize=64)
def _rows_cached(root: str, dirs: tuple[str, ...], comment_prefix: str | None, mcq: bool) -> tuple[dict, ...]:
    rows: list[dict] = []
    for d in dirs:
        for path in task_files(Path(root), d):
            rows.extend(read_rows(path, comment_prefix, mcq))
    return tuple(rows)


def bigbench_rows(
    dirs: tuple[str, ...], comment_prefix: str | None = None, mcq: bool = True, root: Path | None = None
) -> list[dict]:
    """All rows of the given BIG-bench dirs (subtasks merged), read once per process and cached."""
    root = bigbench_dir() if root is None else root
    return list(_rows_cached(str(root), tuple(dirs), comment_prefix, mcq))
