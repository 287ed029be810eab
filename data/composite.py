"""Composite-n: n tasks asked in one prompt, answered as a numbered list, exactly as MeteoRA builds and scores it
(its data/create_composite.py and eval/eval.py).

    ds = build_composite("composite5", rows=200)               # MeteoRA's 5 sub-tasks in its order; prompt, answers
    outputs = [generate(p) for p in ds["prompt"]]
    report = score_composite(outputs, ds)                       # per-task metrics + attempts + correct

Sub-tasks: MeteoRA's lists per n (``composite3/5/10`` in data/task_table.py; the 3- and 5-lists are not prefixes
of the 10-list), or any list of tasks. Rows: one ``random.Random(seed)`` stream (seed 47, MeteoRA's) shuffles
each sub-task's test rows in turn, in sub-task order; row i joins the i-th prompt of every sub-task and keeps the
gold answers per sub-task (``answers[j]``). The test rows are the single-task test split (``split_seed``), less
the rows used as examples.

Prompt (MeteoRA's template, character for character)::

    \nExample 1:\n\n<prompt of sub-task 1, without its final newline>\n\n ... <prompt n>\n\n
    1. <answer 1>\n ... n. <answer n>\n\n\nExample 2:\n\n ... n. <answer n>\n\n\n
    Following the example above, generate answers to the questions below:\n\n
    <test prompt 1>\n\n<test prompt 2>\n\n ... <test prompt n>\n

where each test prompt is the sub-task's own single-task prompt (``[INST] ... [/INST]\n``, so test prompts are
two blank lines apart). The examples are MeteoRA's two fixed ones (``data.composite_shots``: ordinary rows of each
sub-task, built by the same code as the test prompts); an answer is one line (newlines become spaces). The layout
is MeteoRA's character for character; the examples' text is the data's, so it differs where MeteoRA hand-typed
its prefix unlike its own test rows: its question_selection / goal_step_wikihow choice lines carry no indentation
and another order, its own choice lines and alpaca's empty input end "\n[/INST]" (its test rows, and ours,
"\n [/INST]"), and two strings gained a period ("... never come back." and the answer "Place the camera on a
sturdy base.").
``shots=1`` keeps Example 1 only, ``shots=0`` none (the instruction line still opens the questions).

Parsing: answer i is the text after ``i.`` at the start of a line, up to the end of that line (MeteoRA's
``i. (.*?)(\\n|$)``, anchored to a line start so "11." never reads as "1.", and "2.5 m" is no answer 2); a missing
number gives "". Numbers above n, and repeats of a number (the first one counts), are counted in the report.
Where MeteoRA's eval.py reads otherwise, knowingly: it takes the first "i. " anywhere in the output, so an answer
1 ending "in 1862. Then ..." gives answer 2 "Then ...", and a missing "1." line takes "11."'s answer; it needs the
space ("1.yes" is empty there, "yes" here); it keeps trailing spaces ("correct " fails winowhy's exact match).

Scoring: every sub-task with its own metrics (data.scoring.score) over the rows, plus MeteoRA's summaries:
``attempts`` = mean number of non-empty answers per row (n - empties/N), ``correct`` = sum of the sub-tasks'
accuracies.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence

from data.composite_shots import fixed_shots
from data.errors import LoramuxDataError
from data.scoring import score
from data.tasks import get_task, load_split, select

INSTRUCTION = "Following the example above, generate answers to the questions below:"


def one_line(answer: str) -> str:
    """An answer as one line of a numbered list (line breaks become spaces, nothing else changes)."""
    return " ".join(str(answer).strip().splitlines())


def _numbered(answers: Sequence[str]) -> str:
    return "".join(f"{i}. {one_line(a)}\n" for i, a in enumerate(answers, 1))


def composite_prefix(subtasks: Sequence[str], shots: int = 2, split_seed: int = 0, seed: int = 47) -> str:
    """The fixed part of every row's prompt: the examples and the instruction line (MeteoRA's template)."""
    picked = [fixed_shots(t, shots, seed=seed, split_seed=split_seed) for t in subtasks]
    examples = []
    for k in range(shots):
        rows = [p[k] for p in picked]
        prompts = "".join(r["prompt"].rstrip("\n") + "\n\n" for r in rows)
        examples.append(f"Example {k + 1}:\n\n{prompts}{_numbered([r['answer'] for r in rows])}")
    head = "\n" + "\n\n".join(examples) + "\n\n" if examples else ""
    return head + INSTRUCTION + "\n\n"


def build_composite(
    subtasks, *, rows: int = 200, seed: int = 47, shots: int = 2, split_seed: int = 0, repeat_short: bool = False
):
    """A composite-n test set (n = len(subtasks)): `rows` rows (fewer if a sub-task's test split is smaller).

    subtasks: task names or a selection name ("composite3"); split_seed: the seed of the single-task splits, so
    composite rows come from the same held-out test sets as single-task evaluation. repeat_short: instead of
    stopping at the smallest test split, cycle it (row i takes its test row i mod size), e.g. composite10 offline,
    whose news_commentary_de substitute has 30 test rows; every composite row is still a distinct combination.
    Each row's ``sources`` names the test row each sub-task's question came from (its index in that sub-task's
    shuffled test rows): a cycled sub-task asks the same question in several rows, which a bootstrap over rows must
    draw together (``pipeline.report.statistics``' clusters).
    """
    from datasets import Dataset, Features, Sequence, Value  # lazy: slow to import, only building needs it

    names = select(subtasks)
    if len(names) < 2:
        raise LoramuxDataError(f"composite needs at least 2 sub-tasks, got {list(names)}; name more tasks")
    prefix = composite_prefix(names, shots, split_seed, seed)
    rng = random.Random(seed)
    tests = []
    for name in names:
        used = {r["prompt"] for r in fixed_shots(name, shots, seed=seed, split_seed=split_seed)}
        test = [dict(r) for r in load_split(name, "test", seed=split_seed) if r["prompt"] not in used]
        rng.shuffle(test)
        tests.append(test)
    count = rows if repeat_short else min([rows] + [len(t) for t in tests])
    prompts, answers, sources = [], [], []
    for i in range(count):
        picked = [t[i % len(t)] for t in tests]
        prompts.append(prefix + "".join(r["prompt"] + "\n\n" for r in picked)[:-1])
        answers.append([r["answer"] for r in picked])
        sources.append([i % len(t) for t in tests])
    features = Features(
        {"prompt": Value("string"), "answers": Sequence(Value("string")), "subtasks": Sequence(Value("string")),
         "sources": Sequence(Value("int64"))}
    )
    return Dataset.from_dict(
        {"prompt": prompts, "answers": answers, "subtasks": [list(names)] * count, "sources": sources},
        features=features,
    )


def numbered_lines(text: str):
    """``(number, answer)`` of every line of ``text`` that starts with a number and a dot ("3. north"), in order."""
    for match in re.finditer(r"^[ \t]*(\d+)\.(?!\d)[ \t]*(.*?)[ \t]*$", text or "", flags=re.MULTILINE):
        yield int(match.group(1)), match.group(2)


def parse_report(text: str, n: int) -> tuple[list[str], dict[str, int]]:
    """(answers 1..n, counts of missing / extra / duplicate numbers) from one model output."""
    found: dict[int, str] = {}
    extra = duplicate = 0
    for i, answer in numbered_lines(text):
        if not 1 <= i <= n:
            extra += 1
        elif i in found:
            duplicate += 1
        else:
            found[i] = answer
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
