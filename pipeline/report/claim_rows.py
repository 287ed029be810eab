"""Per-row samples of evaluate records, paired across strategies: what the claims' intervals resample.

    rows = record_rows(oracle_rec)                   # {task: TaskRows(keys, stats {metric: [N, k]})}
    sides = paired(rows_oracle, rows_top2, {"winowhy": "accuracy", "topical_chat": "rougeL"})
    if sides: iv = pipeline.report.statistics.mean_difference(*sides)

Single-task records: each predictions line is one row of its task, keyed by (row index, prompt sha1); a skipped
prompt (prediction None) is no row, as evaluate leaves it out of the scores. Composite records: a line holds n
answers; sub-task j's row is the j-th answer parsed from the prediction (``data.composite.parse_composite``)
against the j-th gold answer, keyed by the composite row, clustered by the question it asked (the line's
``sources``: a cycled sub-task asks one question in several rows, drawn together by the bootstrap). Statistics come from ``data.scoring.row_stats``, the
same rules the record's scores were computed with, so their sums give the record's metrics back.

``paired`` keeps, per task, the rows both sides have (same key: the same test prompt) in one order; it returns
None when a task lacks rows or the metric on either side, so a claim never gets an interval over part of its
tasks.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from data.composite import parse_composite
from data.scoring import row_stats
from pipeline.report.records import predictions_of, prompt_sha1
from pipeline.report.statistics import Side


@dataclass
class TaskRows:
    """One task's scored rows of one record: their keys and each metric's per-row statistics."""

    keys: list
    stats: dict
    clusters: list | None = None  # composite rows: the sub-task question each row asked (repeats share one)


def _key(line: dict) -> tuple:
    sha = line.get("prompt_sha1") or (prompt_sha1(str(line["prompt"])) if "prompt" in line else None)
    return int(line["index"]), sha


def record_rows(rec: dict) -> dict[str, TaskRows]:
    """``{task: TaskRows}`` of an evaluate record, from its predictions (cached on the record)."""
    if "_rows" in rec:
        return rec["_rows"]
    groups: dict[str, dict[str, list]] = defaultdict(lambda: {"keys": [], "pred": [], "gold": [], "src": []})
    lines = predictions_of(rec)
    n = int(rec.get("composite_n") or 0)
    if n:
        subtasks = [str(t) for t in rec.get("tasks", [])]
        for line in lines:
            if line.get("prediction") is None:
                continue
            answers = parse_composite(str(line["prediction"]), n)
            for j, sub in enumerate(subtasks):
                g = groups[sub]
                g["keys"].append(_key(line))
                g["pred"].append(answers[j])
                g["gold"].append(str(line["answers"][j]))
                g["src"].append(line["sources"][j] if "sources" in line else None)
    else:
        for line in lines:
            if line.get("prediction") is None:
                continue
            g = groups[str(line["task"])]
            g["keys"].append(_key(line))
            g["pred"].append(str(line["prediction"]))
            g["gold"].append(str(line["answer"]))
    rec["_rows"] = {task: TaskRows(g["keys"], row_stats(task, g["pred"], g["gold"]),
                                   g["src"] if g["src"] and None not in g["src"] else None)
                    for task, g in groups.items()}
    return rec["_rows"]


def paired(a: dict[str, TaskRows], b: dict[str, TaskRows] | None, metrics: dict[str, str]) \
        -> tuple[dict[str, Side], dict[str, Side] | None] | None:
    """Per task of ``metrics`` (task -> metric), the ``Side`` of each record over the rows both have; None when a
    task or metric is missing on a side, or the sides share no row."""
    sa, sb = {}, ({} if b is not None else None)
    for task, metric in metrics.items():
        if task not in a or metric not in a[task].stats:
            return None
        if b is None:
            sa[task] = Side(metric, a[task].stats[metric], _clusters(a[task], None))
            continue
        if task not in b or metric not in b[task].stats:
            return None
        where = {k: i for i, k in enumerate(b[task].keys)}
        ia = [i for i, k in enumerate(a[task].keys) if k in where]
        if not ia:
            return None
        ib = [where[a[task].keys[i]] for i in ia]
        clusters = _clusters(a[task], ia)  # the same questions on both sides: whichever side's record names them
        clusters = _clusters(b[task], ib) if clusters is None else clusters
        sa[task] = Side(metric, a[task].stats[metric][np.asarray(ia)], clusters)
        sb[task] = Side(metric, b[task].stats[metric][np.asarray(ib)], clusters)
    return (sa, sb) if sa else None


def _clusters(rows: TaskRows, keep: list[int] | None):
    """The cluster ids of ``rows`` (those at ``keep``), or None where the record has none (single-task rows, and
    composite records written before evaluate kept each row's ``sources``)."""
    if rows.clusters is None:
        return None
    return np.asarray(rows.clusters if keep is None else [rows.clusters[i] for i in keep])


__all__ = ["TaskRows", "paired", "record_rows"]
