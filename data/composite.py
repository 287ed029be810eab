"""Composite-n: n tasks asked in one prompt, answered as a numbered list (MeteoRA's create_composite.py / eval.py).

    ds = build_composite(select("composite3"), rows=200)        # columns prompt, answers, subtasks
    outputs = [generate(p) for p in ds["prompt"]]
    report = score_composite(outputs, ds)                       # per-task metrics + attempts + correct

Building (as MeteoRA's create_composite.py does): each sub-task's test split is shuffled with `seed` (47, MeteoRA's) and row i joins the
i-th prompt of every sub-task, in sub-task order; the gold answers stay per sub-task (`answers[j]` for sub-task j).
The prompt opens with a `shots`-shot prefix built from TRAINING rows (never test rows): shot k asks the k-th
example of every sub-task and answers them as `1. ...` .. `n. ...`; then "Following the example above, generate
answers to the questions below:" and the n test prompts. Shots are the shortest of each sub-task's first 64
shuffled training rows, so the prefix stays as short as the data allows; newlines inside shot answers become
spaces, since an answer is one line.

Parsing: answer i is the text after `i.` at the start of a line, up to the end of that line (MeteoRA's
`i. (.*?)(\\n|$)`, anchored to a line start so "11." never reads as "1.", and "2.5 m" is no answer 2); a missing
number gives "". Numbers above
n, and repeats of a number (the first one counts), are counted in the report.

Scoring: every sub-task with its own metrics (data.scoring.score) over the rows, plus MeteoRA's summaries:
`attempts` = mean number of non-empty answers per row (n - empties/N), `correct` = sum of the sub-tasks' accuracies.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from data.errors import LoramuxDataError
from data.scoring import score
from data.tasks import get_task, load_split, select

INSTRUCTION = "Following the example above, generate answers to the questions below:"
SHOT_POOL = 64


def _numbered(answers: Sequence[str]) -> str:
    return "".join(f"{i}. {' '.join(str(a).split())}\n" for i, a in enumerate(answers, 1))


def _shuffled(ds, seed: int):
    return ds.select(np.random.default_rng(seed).permutation(len(ds)).tolist())


def _shots(subtasks: Sequence[str], shots: int, seed: int, split_seed: int) -> str:
    """The few-shot prefix: `shots` blocks of n training prompts + their numbered answers."""
    if shots <= 0:
        return ""
    picked = []
    for name in subtasks:
        train = _shuffled(load_split(name, "train", seed=split_seed, max_train=SHOT_POOL), seed)
        order = sorted(range(len(train)), key=lambda i: (len(train[i]["prompt"]) + len(train[i]["answer"]), i))
        if len(order) < shots:
            raise LoramuxDataError(f"task {name} has {len(order)} training rows, fewer than shots={shots}; lower shots")
        picked.append([train[i] for i in order[:shots]])
    blocks = []
    for k in range(shots):
        prompts = "".join(picked[j][k]["prompt"] for j in range(len(subtasks)))
        blocks.append(prompts + _numbered([picked[j][k]["answer"] for j in range(len(subtasks))]))
    return "\n".join(blocks) + "\n"


def build_composite(
    subtasks, *, rows: int = 200, seed: int = 47, shots: int = 2, split_seed: int = 0, repeat_short: bool = False
):
    """A composite-n test set (n = len(subtasks)): `rows` rows (fewer if a sub-task's test split is smaller).

    subtasks: task names or a selection name ("composite3"); split_seed: the seed of the single-task splits, so
    composite rows come from the same held-out test sets as single-task evaluation. repeat_short: instead of
    stopping at the smallest test split, cycle it (row i takes its test row i mod size), e.g. composite10 offline,
    whose news_commentary_de substitute has 30 test rows; every composite row is still a distinct combination.
    """
    from datasets import Dataset, Features, Sequence, Value  # lazy: slow to import, only building needs it

    names = select(subtasks)
    if len(names) < 2:
        raise LoramuxDataError(f"composite needs at least 2 sub-tasks, got {list(names)}; name more tasks")
    tests = [_shuffled(load_split(n, "test", seed=split_seed), seed) for n in names]
    count = rows if repeat_short else min([rows] + [len(t) for t in tests])
    prefix = _shots(names, shots, seed, split_seed) + INSTRUCTION + "\n"
    prompts, answers = [], []
    for i in range(count):
        picked = [t[i % len(t)] for t in tests]
        prompts.append(prefix + "".join(r["prompt"] for r in picked))
        answers.append([r["answer"] for r in picked])
    features = Features(
        {"prompt": Value("string"), "answers": Sequence(Value("string")), "subtasks": Sequence(Value("string"))}
    )
    return Dataset.from_dict(
        {"prompt": prompts, "answers": answers, "subtasks": [list(names)] * count}, features=features
    )


def parse_report(text: str, n: int) -> tuple[list[str], dict[str, int]]:
    """(answers 1..n, counts of missing / extra / duplicate numbers) from one model output."""
    found: dict[int, str] = {}
    extra = duplicate = 0
    for match in re.finditer(r"^[ \t]*(\d+)\.(?!\d)[ \t]*(.*?)[ \t]*$", text or "", flags=re.MULTILINE):
        i = int(match.group(1))
        if not 1 <= i <= n:
            extra += 1
        elif i in found:
            duplicate += 1
        else:
            found[i] = match.group(2)
    answers = [found.get(i, "") for i in range(1, n + 1)]
    return answers, {"missing": n - len(found), "extra": extra, "duplicate": duplicate}


def parse_composite(text: str, n: int) -> list[str]:
    """Answers 1..n from a numbered-list output; a missing answer is ""."""
    return parse_report(text, n)[0]


def score_composite(outputs: Sequence[str], dataset) -> dict:
    """Per-sub-task metrics plus attempts, correct and parse counts for model outputs on a composite set."""
    if len(outputs) != len(dataset):
        raise LoramuxDataError(f"{len(outputs)} outputs for {len(dataset)} composite rows; pass one output per row")
    if len(dataset) == 0:
        raise LoramuxDataError("empty composite set; build it with rows >= 1")
    names = list(dataset[0]["subtasks"])
    n = len(names)
    parsed, counts = [], {"missing": 0, "extra": 0, "duplicate": 0}
    for text in outputs:
        answers, report = parse_report(text, n)
        parsed.append(answers)
        for k in counts:
            counts[k] += report[k]
    gold = dataset["answers"]
    per_task = {}
    for j, name in enumerate(names):
        get_task(name)
        per_task[name] = score(name, [p[j] for p in parsed], [g[j] for g in gold])
    empties = sum(1 for p in parsed for a in p if not a.strip())
    return {
        "per_task": per_task,
        "attempts": n - empties / len(parsed),
        "correct": sum(m["accuracy"] for m in per_task.values() if "accuracy" in m),
        "rows": len(parsed),
        "n": n,
        **counts,
    }
