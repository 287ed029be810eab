"""metrics.json records -> the paper tables, as plain ``Table`` objects (columns + rows) ready to render.

Which table a record feeds depends on its stage:

* ``finetune``  -> ``finetune``: one row per adapter (validation loss, steps, speed); a joint run (``task=all``)
  gives one row per adapter it trained (its ``rows``), with the joint run's time and tokens/s.
* ``evaluate``  -> ``tasks``: one row per task, one column per strategy, cell = the task's score
  (``<task>/score``: accuracy, or BLEU where a task has no accuracy), plus a ``mean`` row; MeteoRA Fig. 3,
  DLP-LoRA T1/T2.
* ``evaluate`` with ``composite_n`` -> ``composite_<n>``: rows = sub-tasks + attempts + correct, one column per
  strategy; MeteoRA's composite table.
* ``bench``     -> ``latency``: the bench rows (strategy, adapters, round group, batch, lengths, prefill tok/s, decode
  ms/token, ratio to base under the same engine); DLP-LoRA T4/T6.

When a sweep is rerun, the newest record of each (stage, strategy, tasks, composite_n) wins.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass
class Table:
    """A named table: ``columns`` and ``rows`` (lists of cells), plus a caption."""

    name: str
    title: str
    columns: list[str]
    rows: list[list] = field(default_factory=list)
    caption: str = ""


def _key(rec: dict) -> tuple:
    return (rec["stage"], rec.get("strategy"), tuple(rec.get("tasks") or ()), rec.get("composite_n"))


def latest_records(records: list[dict]) -> list[dict]:
    """Keep the newest record (by provenance date, then input order) of each (stage, strategy, tasks, n)."""
    best: dict[tuple, dict] = {}
    for rec in records:
        k = _key(rec)
        if k not in best or str(rec["provenance"].get("date", "")) >= str(best[k]["provenance"].get("date", "")):
            best[k] = rec
    return list(best.values())


def _fmt(value):
    if value is None:
        return None
    if isinstance(value, float):
        return None if not math.isfinite(value) else round(value, 4)
    return value


def _adapter_rows(rec: dict) -> list[tuple[str, dict]]:
    """(adapter, its metrics) of a finetune record: one per separate run, one per row of a joint run."""
    if rec.get("joint"):
        return [(row["adapter"], row) for row in rec.get("rows", [])]
    return [(rec["tasks"][0], rec["metrics"])]


def finetune_table(records: list[dict]) -> Table | None:
    newest: dict[str, tuple[str, dict]] = {}  # adapter -> (date, metrics): a separate and a joint run of one adapter
    for rec in (r for r in records if r["stage"] == "finetune"):
        date = str(rec["provenance"].get("date", ""))
        for name, metrics in _adapter_rows(rec):
            if name not in newest or date >= newest[name][0]:
                newest[name] = (date, {**metrics, "run": "joint" if rec.get("joint") else "own"})
    if not newest:
        return None
    cols = ["adapter", "run", "val_loss", "train_loss", "steps", "train_rows", "train_seconds", "tokens_per_s"]
    rows = [[name] + [_fmt(newest[name][1].get(c)) for c in cols[1:]] for name in sorted(newest)]
    return Table("finetune", "Adapters (finetune)", cols, rows, "run: joint (every task adapter in one run, the run's "
                 "time and tokens/s) or own; validation loss on answer tokens; tokens/s counts prompt + answer tokens "
                 "(fit time incl. validation)")


def _strategy_order(labels):
    prefer = ["base", "oracle", "peft", "lora_b", "merge", "meteora-top1", "meteora-top2", "dlp", "dlp-segments"]
    return sorted(set(labels), key=lambda s: (prefer.index(s) if s in prefer else len(prefer), s))


def tasks_table(records: list[dict]) -> Table | None:
    recs = [r for r in records if r["stage"] == "evaluate" and r.get("composite_n") in (None, 0)]
    if not recs:
        return None
    strategies = _strategy_order(r["strategy"] for r in recs)
    by_strategy = {r["strategy"]: r for r in recs}
    tasks: list[str] = []
    for r in recs:
        tasks += [t for t in r["tasks"] if t not in tasks]
    rows = []
    for t in tasks:
        rows.append([t] + [_fmt(by_strategy[s]["metrics"].get(f"{t}/score")) for s in strategies])
    means = []
    for i, _ in enumerate(strategies):
        vals = [row[i + 1] for row in rows if row[i + 1] is not None]
        means.append(round(sum(vals) / len(vals), 4) if vals else None)
    rows.append(["mean"] + means)
    return Table("tasks", "Per-task score by routing strategy", ["task"] + strategies, rows,
                 "score = accuracy, else ROUGE-L, else BLEU/100; greedy decoding")


def composite_tables(records: list[dict]) -> list[Table]:
    out = []
    recs = [r for r in records if r["stage"] == "evaluate" and r.get("composite_n")]
    for n in sorted({int(r["composite_n"]) for r in recs}):
        group = [r for r in recs if int(r["composite_n"]) == n]
        strategies = _strategy_order(r["strategy"] for r in group)
        by_strategy = {r["strategy"]: r for r in group}
        subtasks: list[str] = []
        for r in group:
            subtasks += [t for t in r["tasks"] if t not in subtasks]
        rows = [[t] + [_fmt(by_strategy[s]["metrics"].get(f"{t}/score")) for s in strategies] for t in subtasks]
        for extra in ("attempts", "correct"):
            rows.append([extra] + [_fmt(by_strategy[s]["metrics"].get(extra)) for s in strategies])
        out.append(Table(f"composite_{n}", f"Composite-{n}: per-sub-task score", ["sub-task"] + strategies, rows,
                         "attempts = n - empty answers / N; correct = sum of sub-task accuracies (MeteoRA)"))
    return out


LATENCY_COLUMNS = ["shape", "engine", "strategy", "num_adapters", "alongside", "batch_size", "prompt_len",
                   "new_tokens", "prefill_tok_s", "decode_ms_per_token", "ratio_to_base"]


def latency_table(records: list[dict]) -> Table | None:
    rows = []
    for r in records:
        if r["stage"] == "bench":
            rows += [[_fmt(row.get(c)) for c in LATENCY_COLUMNS] for row in r.get("rows", [])]
    if not rows:
        return None
    return Table("latency", "End-to-end latency", LATENCY_COLUMNS, rows,
                 "decode ms/token; alongside = the bank size of the interleaved rounds the row was timed in (base "
                 "and peft are timed beside every bank); ratio_to_base = decode time over the base model's timed "
                 "with it (same engine and round group)")


def build_tables(records: list[dict]) -> list[Table]:
    """All tables the records support, in report order."""
    records = latest_records(records)
    tables = [finetune_table(records), tasks_table(records), *composite_tables(records), latency_table(records)]
    return [t for t in tables if t is not None]
