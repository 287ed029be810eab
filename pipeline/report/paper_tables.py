"""The papers' tables, as committed results: ``<dir>/<experiment>.json`` + ``.md`` (+ ``.png`` where a paper has a
figure), built from one experiment's metrics.json records, with the papers' claims computed from the rows.

    from pipeline.report.paper_tables import write_paper_table
    write_paper_table("dlp_tasks", records, "outputs/tables", config={...})   # the report stage calls this

JSON: ``{"table", "provenance": {git_sha, device, torch, triton, transformers, versions, by_run, report_config,
date, runs, wall_time_s, records, bigbench (where the runs name their BIG-bench source)}, "rows": [...], "claims": [{claim, measured, threshold, holds, interval, verdict,
reason}], ...}``. ``provenance.by_run`` holds, per run that made a row (``<stage>/<step>``), its git sha, date,
wall time, ``allow_dirty`` and its own composed config (the ``config.yaml`` the stage saved; ``report_config`` is
the report call's, ``runs`` the first and last run date); each row's ``runs`` names the run of each column.
Claims: ``pipeline.report.paper_claims`` (point estimate, paired bootstrap interval from the runs' predictions, verdict).
Rows per table (scores: accuracy and ROUGE as fractions in [0, 1], BLEU 0-100; None where a run is missing):

* ``meteora_tasks``: ``{task, metric, peft, meteora_top1, meteora_top2, lora_b, merge, gate_accuracy,
  gate_confused_with, runs}`` (+ ``peft_cotrained`` where its run exists, ``gate_accuracy_answers`` where the route
  record splits its accuracy); ``peft`` = the oracle (each task's own
  adapter); ``metric`` = accuracy where the task has it, else rougeL, else bleu; ``gate_accuracy`` = the route
  stage's validation routing accuracy on the task's tokens (None where the route record has no per-task counts),
  ``gate_accuracy_answers`` the same on its answer tokens alone (where the gates route while the model writes);
  ``gate_confused_with`` = the tasks the gates chose instead, with their share of the task's (token, gate) pairs
  (the route record's ``router_confusion``; None without it). Top-level ``router``: the MeteoRA gates' route
  stage (validation token routing accuracy, steps, the target accuracy and the step it was reached, what stopped
  it, the curve).
* ``meteora_composite``: ``{n, subtask, metric, meteora, lora_b, meteora_answered, lora_b_answered, runs}``
  (``*_answered``: share of rows with a non-empty answer to that sub-task); top-level ``per_n`` =
  ``[{n, measure: "attempts" | "correct" | "no_text_at_budget", meteora, lora_b}]`` (MeteoRA's attempts and correct
  of each n; the rows that ran their whole budget writing no text, where the records count them).
* ``dlp_tasks``: ``{task, kind: mcq | qa, metric, base, single_lora, dlp, runs}``; MCQ tasks one ``accuracy`` row,
  QA tasks one row per metric: their own accuracy (if any), ``bleu``, ``rouge1``, ``rougeL`` (BLEU/ROUGE a task's
  registry does not score are computed here from the run's predictions.jsonl with the same metric modules).
  Top-level ``router_accuracy`` (the route stage's validation accuracy) and ``router_accuracy_test`` (top-1 of
  the dlp router's test-set routes in evaluate's predictions, where they were saved).
* ``dlp_latency``: ``{model, n_adapters, phase: prefill | decode, base_ms, single_lora_ms, dlp_ms,
  meteora_top2_ms, runs}``: prefill = time to the first token of the whole batch (ms), decode = ms per new token;
  ``single_lora`` = one unmerged peft LoRA; rows of one engine/batch/prompt length (``setting``), other
  engines' rows in ``other_engines``; base and single LoRA at each n are the ones timed together with that bank
  size, whose raw interleaved rounds are in ``rounds`` (``{model: {n: {strategy: [[t_1, t_N], ...]}}}``).
* ``head_to_head``: ``{strategy, avg_score, decode_ms, peak_mem_gb, runs}``: mean single-task score (BLEU/100),
  decode ms/token and CUDA peak memory at the experiment's adapter count; ``composite`` = composite-n ``correct``
  and ``attempts``; ``task_metrics``: the metric each task's score is (what the claims' intervals resample);
  ``rounds``: the decode timings' raw interleaved rounds where the bench kept them (the speed claim's interval).
"""

from __future__ import annotations

import datetime as dt
import json
import math
from pathlib import Path

from common.atomic import atomic_write_text
from data.scoring import load_metric
from data.task_table import DLP26_MCQ, DLP26_QA
from data.tasks import get_task
from pipeline.report.paper_claims import table_claims
from pipeline.report.records import config_of, predictions_of, run_key
from pipeline.report.render import adapter_axis, bar_plot, pyplot, radar_plot, save_figure
from pipeline.report.tables import Table, latest_records

PAPER_TABLES = ("meteora_tasks", "meteora_composite", "dlp_tasks", "dlp_latency", "head_to_head")
PRIMARY = ("accuracy", "rougeL", "bleu")
#: composite-n's sub-tasks are compared as MeteoRA's eval.py scores them: accuracy, else BLEU (its only metric for
#: news_commentary_de; alpaca and linguistics_puzzles get ROUGE beside it, and its "8 of 10" at n = 10 counts BLEU:
#: by ROUGE-L its own alpaca row would turn from a loss into a win)
COMPOSITE_PRIMARY = ("accuracy", "bleu", "rougeL")


# ------------------------------------------------------------------------------------------------ helpers
def _num(v):
    if v is None or isinstance(v, bool):
        return None
    try:
        v = float(v)
    except (TypeError, ValueError):
        return None
    return round(v, 6) if math.isfinite(v) else None


def _unit(metric: str, v):
    """A score on [0, 1] (BLEU / 100), for averages across tasks."""
    return None if v is None else (v / 100.0 if metric == "bleu" else v)


def _mean(vals, digits: int = 6):
    """The mean of the values that are not None, rounded to ``digits``; None when there are none."""
    vals = [v for v in vals if v is not None]
    return round(sum(vals) / len(vals), digits) if vals else None


def _evaluate(records, composite: bool = False) -> dict[str, dict]:
    """strategy label -> the newest evaluate record (single-task or composite)."""
    out = {}
    for r in records:
        if r["stage"] == "evaluate" and bool(r.get("composite_n")) == composite:
            out[str(r["strategy"])] = r
    return out


def _ordered_tasks(recs) -> list[str]:
    tasks: list[str] = []
    for r in recs:
        tasks += [str(t) for t in r.get("tasks", []) if str(t) not in tasks]
    return tasks


def primary_metric(task: str, recs, order: tuple = PRIMARY) -> str | None:
    """The metric a task is reported with: the first of ``order`` (accuracy, else rougeL, else bleu) any record
    has."""
    for m in order:
        if any(r["metrics"].get(f"{task}/{m}") is not None for r in recs):
            return m
    return None


def _runs(columns: dict[str, dict | None]) -> dict[str, str]:
    """A row's ``runs``: column -> the run (``<stage>/<step>``) that made it."""
    return {col: run_key(rec) for col, rec in columns.items() if rec is not None}


def _route(records, strategy: str) -> dict | None:
    return next((r for r in records if r["stage"] == "route" and r.get("strategy") == strategy), None)


# ------------------------------------------------------------------------------------------- meteora_tasks
METEORA_TASK_COLUMNS = {"peft": "oracle", "meteora_top1": "meteora-top1", "meteora_top2": "meteora-top2",
                        "lora_b": "lora_b", "merge": "merge"}
#: columns a table has only where their run exists: ``peft_cotrained`` is the oracle over the adapters MeteoRA's
#: gates were trained together with (``router.adapters_from``), which splits the oracle-to-MeteoRA gap into what the
#: adapters' change costs (peft - peft_cotrained) and what the routing costs (peft_cotrained - meteora_top2);
#: ``meteora_top2_frozen`` is MeteoRA top-2 with those gates over the adapters as fine-tuned
#: (``router.adapters_from=experiment``): how well the gates route adapters they were not trained with
METEORA_TASK_OPTIONAL = {"peft_cotrained": "oracle-cotrained", "meteora_top2_frozen": "meteora-top2-frozen"}


def meteora_tasks(records: list[dict]) -> dict:
    ev = _evaluate(records)
    columns = {**METEORA_TASK_COLUMNS, **{c: s for c, s in METEORA_TASK_OPTIONAL.items() if s in ev}}
    recs = [ev[s] for s in columns.values() if s in ev]
    route = _route(records, "meteora")
    gates = (route or {}).get("router_accuracy_by_task") or {}  # each task's gate routing accuracy (validation)
    answers = (route or {}).get("router_accuracy_answers_by_task")  # the same on its answer tokens (newer records)
    confused = ((route or {}).get("router_confusion") or {}).get("confused_with") or {}
    rows = []
    for task in _ordered_tasks(recs):
        metric = primary_metric(task, recs)
        row = {"task": task, "metric": metric}
        for col, label in columns.items():
            row[col] = _num(ev[label]["metrics"].get(f"{task}/{metric}")) if label in ev and metric else None
        row["gate_accuracy"] = _num(gates.get(task))
        if answers is not None:
            row["gate_accuracy_answers"] = _num(answers.get(task))
        row["gate_confused_with"] = confused_cell(confused.get(task))
        row["runs"] = _runs({**{col: ev.get(label) for col, label in columns.items()},
                             "gate_accuracy": route if task in gates else None})
        rows.append(row)
    avg = {col: _mean(_unit(r["metric"], r[col]) for r in rows) for col in columns}
    return {"rows": rows, "averages": avg, "router": router_info(_route(records, "meteora")),
            "_sources": {col: ev[label] for col, label in columns.items() if label in ev}}


def confused_cell(pairs) -> str | None:
    """A task's largest confusions from the route record's ``router_confusion.confused_with`` (``[[other task,
    share of its (token, gate) pairs], ...]``) as one cell, ``"b 0.31, c 0.05"``; None without counts or
    confusions."""
    if not pairs:
        return None
    return ", ".join(f"{other} {share:.2f}" for other, share in pairs)


def router_info(route: dict | None) -> dict | None:
    """What a route record says about its router: validation routing accuracy, steps, its validation LM loss,
    whether the LoRA weights were trained with it (``router.train.train_loras`` of the run's config; None: the
    config is not there to tell), (with a target) the step the target accuracy was reached at (None: not
    reached), what stopped the fit, and the validation curve."""
    if route is None:
        return None
    m = route["metrics"]
    train = ((config_of(route) or {}).get("router") or {}).get("train") or {}
    return {"run": run_key(route), "router_accuracy": _num(m.get("router_accuracy")), "steps": m.get("steps"),
            "lm_loss": _num(m.get("lm_loss")), "train_loras": train.get("train_loras"),
            "target_accuracy": _num(route.get("target_accuracy")),
            "target_reached_step": route.get("target_reached_step"), "stopped_by": stopped_by(route),
            "curve": [[int(s), _num(a)] for s, a in route.get("router_accuracy_curve") or []],
            **({"answers": _num(route["router_accuracy_answers"]), "prompts": _num(route["router_accuracy_prompts"])}
               if "router_accuracy_answers" in route else {}),
            **({"ceiling": _num(route["router_accuracy_ceiling"])} if "router_accuracy_ceiling" in route else {}),
            **({"one_token": _num(route["router_accuracy_one_token"])} if "router_accuracy_one_token" in route else {})}


def stopped_by(route: dict) -> str | None:
    """Why the route stage's fit ended, from its record and its own config: ``target`` (the target accuracy was
    reached), ``router.train.steps`` (the step bound), ``trainer.max_time=<limit>`` (a wall-clock limit ended it
    first), or None when the config is not there to tell."""
    if route.get("target_reached_step") is not None:
        return "target"
    cfg = config_of(route)
    if not cfg:
        return None
    steps, bound = route["metrics"].get("steps"), (cfg.get("router") or {}).get("train", {}).get("steps")
    limit = (cfg.get("trainer") or {}).get("max_time")
    if limit and steps is not None and bound is not None and int(steps) < int(bound):
        return f"trainer.max_time={limit}"
    return "router.train.steps"


# --------------------------------------------------------------------------------------- meteora_composite
def _composite_side(label: str) -> str | None:
    if label.startswith("meteora"):
        return "meteora"
    return "lora_b" if label == "lora_b" else None


def meteora_composite(records: list[dict]) -> dict:
    by_n: dict[int, dict[str, dict]] = {}
    for r in records:
        side = _composite_side(str(r["strategy"])) if r["stage"] == "evaluate" and r.get("composite_n") else None
        if side:
            by_n.setdefault(int(r["composite_n"]), {})[side] = r
    rows, per_n = [], []
    for n in sorted(by_n):
        group = by_n[n]
        recs = list(group.values())
        for sub in _ordered_tasks(recs):
            metric = primary_metric(sub, recs, COMPOSITE_PRIMARY)
            row = {"n": n, "subtask": sub, "metric": metric}
            for side in ("meteora", "lora_b"):
                row[side] = _num(group[side]["metrics"].get(f"{sub}/{metric}")) if side in group and metric else None
            for side in ("meteora", "lora_b"):
                m = group[side]["metrics"] if side in group else {}
                empty, count = m.get(f"{sub}/empty"), m.get(f"{sub}/n")
                row[f"{side}_answered"] = _num(1 - empty / count) if empty is not None and count else None
            row["runs"] = _runs({side: group.get(side) for side in ("meteora", "lora_b")})
            rows.append(row)
        for measure in ("attempts", "correct", "no_text_at_budget"):  # the last where the records have it
            if measure == "no_text_at_budget" and not any(measure in r["metrics"] for r in recs):
                continue
            per_n.append({"n": n, "measure": measure,
                          **{side: _num(group[side]["metrics"].get(measure)) if side in group else None
                             for side in ("meteora", "lora_b")}})
    return {"rows": rows, "per_n": per_n, "_sources": by_n}


# ---------------------------------------------------------------------------------------------- dlp_tasks
DLP_COLUMNS = {"base": "base", "single_lora": "oracle", "dlp": "dlp"}
QA_METRICS = ("accuracy", "bleu", "rouge1", "rougeL")


def dlp_kind(task: str) -> str:
    """mcq | qa as DLP-LoRA's table groups it (``data.task_table.DLP26_*``, else the registry's kind)."""
    if task in DLP26_MCQ:
        return "mcq"
    if task in DLP26_QA:
        return "qa"

    return get_task(task).kind


def _text_metrics(rec: dict, task: str, cache: dict) -> dict:
    """BLEU / ROUGE of one task from the run's predictions.jsonl (for QA tasks whose registry skips them)."""
    key = (rec.get("_path"), task)
    if key not in cache:
        pairs = [(p["prediction"], p["answer"]) for p in predictions_of(rec)
                 if p.get("task") == task and p.get("prediction") is not None]
        out = {}
        if pairs:
            preds, refs = [str(p) for p, _ in pairs], [str(a) for _, a in pairs]
            out.update(load_metric("bleu").compute(predictions=preds, references=refs))
            out.update(load_metric("rouge").compute(predictions=preds, references=refs))
        cache[key] = out
    return cache[key]


def router_hits(dlp_rec: dict | None, adapters: list[str]) -> list[int]:
    """One 0/1 per test prompt: whether its top-1 dlp route is its own task's adapter (from the predictions)."""
    if dlp_rec is None or not adapters:
        return []
    hits = []
    for p in predictions_of(dlp_rec):
        route = p.get("route") or {}
        ids, weights = route.get("ids"), route.get("weights")
        if not ids or p.get("task") not in adapters:
            continue
        top = max(range(len(ids)), key=lambda k: (ids[k] >= 0, weights[k] if weights else 0))
        hits.append(int(ids[top] == adapters.index(p["task"])))
    return hits


def router_test_accuracy(dlp_rec: dict | None, adapters: list[str]) -> float | None:
    """Share of test prompts whose top-1 dlp route is their own task's adapter (from the predictions)."""
    hits = router_hits(dlp_rec, adapters)
    return round(sum(hits) / len(hits), 6) if hits else None


def dlp_tasks(records: list[dict]) -> dict:
    ev = _evaluate(records)
    recs = [ev[s] for s in DLP_COLUMNS.values() if s in ev]
    rows, cache, computed = [], {}, set()
    for task in _ordered_tasks(recs):
        kind = dlp_kind(task)
        metrics = ["accuracy"] if kind == "mcq" else [m for m in QA_METRICS if m != "accuracy" or
                                                      any(r["metrics"].get(f"{task}/accuracy") is not None
                                                          for r in recs)]
        for metric in metrics:
            row = {"task": task, "kind": kind, "metric": metric}
            for col, label in DLP_COLUMNS.items():
                v = None
                if label in ev:
                    v = ev[label]["metrics"].get(f"{task}/{metric}")
                    if v is None and metric != "accuracy":
                        v = _text_metrics(ev[label], task, cache).get(metric)
                        if v is not None:
                            computed.add(task)
                row[col] = _num(v)
            row["runs"] = _runs({col: ev.get(label) for col, label in DLP_COLUMNS.items()})
            rows.append(row)
    route = _route(records, "dlp")
    val_acc = _num(route["metrics"].get("router_accuracy")) if route else None
    adapters = [str(a) for a in (route or {}).get("adapters") or []]
    hits = router_hits(ev.get("dlp"), adapters)
    test_acc = round(sum(hits) / len(hits), 6) if hits else None
    mcq = [r for r in rows if r["kind"] == "mcq"]
    avg = {col: _mean(r[col] for r in mcq) for col in DLP_COLUMNS}
    return {"rows": rows, "router_accuracy": val_acc, "router_accuracy_test": test_acc, "router": router_info(route),
            "mcq_averages": avg, "bleu_rouge_from_predictions": sorted(computed),
            "_sources": {**{col: ev[label] for col, label in DLP_COLUMNS.items() if label in ev}, "router_hits": hits}}


# -------------------------------------------------------------------------------------------- dlp_latency
LATENCY_COLUMNS = {"dlp_ms": "dlp", "meteora_top2_ms": "meteora-top2"}


def _bench_rows(records) -> list[dict]:
    return [row for r in records if r["stage"] == "bench" for row in r.get("rows", [])]


def _setting(brows: list[dict], engine: str) -> dict | None:
    """The (batch, prompt length) the table reports: the smallest measured under ``engine``."""
    rows = [r for r in brows if r["engine"] == engine]
    if not rows:
        return None
    b = min(r["batch_size"] for r in rows)
    s = min(r["prompt_len"] for r in rows if r["batch_size"] == b)
    return {"engine": engine, "batch_size": b, "prompt_len": s, "new_tokens": rows[0].get("new_tokens")}


def latency_rows(brows: list[dict], setting: dict) -> list[dict]:
    """Rows ``{model, n_adapters, phase, base_ms, single_lora_ms, dlp_ms, meteora_top2_ms}`` of one setting."""
    sel = [r for r in brows if r["engine"] == setting["engine"] and r["batch_size"] == setting["batch_size"]
           and r["prompt_len"] == setting["prompt_len"]]
    field = {"prefill": "prefill_ms", "decode": "decode_ms_per_token"}
    out = []
    for model in dict.fromkeys(r.get("model", r["shape"]) for r in sel):
        mrows = [r for r in sel if r.get("model", r["shape"]) == model]

        def get(strategy, n, phase, mrows=mrows):
            hit = [r for r in mrows if r["strategy"] == strategy and (n is None or r["num_adapters"] == n)]
            return _num(hit[-1].get(field[phase])) if hit else None
        ns = sorted({r["num_adapters"] for r in mrows if r["strategy"] in LATENCY_COLUMNS.values()})
        for n in ns:
            # base and peft: the ones timed together with bank size n, where they were
            beside = [r for r in mrows if r.get("alongside") == n] or mrows
            for phase in ("prefill", "decode"):
                out.append({"model": model, "n_adapters": n, "phase": phase,
                            "base_ms": get("base", None, phase, beside),
                            "single_lora_ms": get("peft", None, phase, beside),
                            **{col: get(s, n, phase) for col, s in LATENCY_COLUMNS.items()}})
    return out


def latency_rounds(brows: list[dict], setting: dict) -> dict:
    """``{model: {n: {strategy: [[t_1, t_N], ...]}}}``: the interleaved rounds of each bank size's round group
    (base, peft and the routers timed together, ``bench.ShapeBench.measure_together``) in the table's setting;
    empty for rows timed one strategy after another (tables before the rounds were kept)."""
    out: dict = {}
    for r in brows:
        if (r.get("rounds") and r.get("alongside") is not None and r["engine"] == setting["engine"]
                and r["batch_size"] == setting["batch_size"] and r["prompt_len"] == setting["prompt_len"]):
            out.setdefault(r.get("model", r["shape"]), {}).setdefault(str(r["alongside"]), {})[r["strategy"]] = \
                r["rounds"]
    return out


def latency_grouped(brows: list[dict]) -> dict:
    """``{strategy: "yes" | "no" | "mixed"}``: whether each router's rows decoded through the bank's projection
    groups (a bench row's ``grouped``: ``MultiLoRAModel.decodes_grouped``; at 1df9a9e MeteoRA's per-projection gates
    still left a q / v bank's groups, k without a gate, to their members). Empty for rows from before the bench
    recorded it."""
    seen: dict = {}
    for r in brows:
        if "grouped" in r and r["strategy"] in LATENCY_COLUMNS.values():
            seen.setdefault(r["strategy"], set()).add(bool(r["grouped"]))
    return {s: "mixed" if len(v) > 1 else "yes" if True in v else "no" for s, v in seen.items()}


def _ratio(a, b):
    return None if a is None or not b else round(a / b, 4)


def dlp_latency(records: list[dict], claim_model: str = "llama3_8b", engine: str = "eager") -> dict:
    brows = _bench_rows(records)
    engines = list(dict.fromkeys(r["engine"] for r in brows))
    main = engine if engine in engines else (engines[0] if engines else engine)
    setting = _setting(brows, main)
    rows = latency_rows(brows, setting) if setting else []
    others = {}
    for e in engines:
        if e != main:
            s = _setting(brows, e)
            others[e] = {"setting": s, "rows": latency_rows(brows, s)}
    bench = next((r for r in records if r["stage"] == "bench"), None)
    for row in [*rows, *[r for o in others.values() for r in o["rows"]]]:
        row["runs"] = _runs({"ms": bench})
    out = {"rows": rows, "setting": setting, "other_engines": others, "claim_model": claim_model}
    grouped = latency_grouped(brows)
    if grouped:
        out["grouped"] = grouped
    rounds = latency_rounds(brows, setting) if setting else {}
    if rounds:  # the raw per-round times the claims' intervals come from
        out["rounds"] = rounds
    return out


# ------------------------------------------------------------------------------------------- head_to_head
def _canon(label: str) -> str:
    return str(label).replace("_", "-")


def head_to_head(records: list[dict], engine: str = "eager") -> dict:
    ev = _evaluate(records)
    comp = _evaluate(records, composite=True)
    brows = _bench_rows(records)
    setting = _setting(brows, engine) or _setting(brows, brows[0]["engine"] if brows else engine)
    sel = [r for r in brows if setting and r["engine"] == setting["engine"] and r["batch_size"] ==
           setting["batch_size"] and r["prompt_len"] == setting["prompt_len"]]
    n_max = max((r["num_adapters"] for r in sel), default=None)
    bench_at = {}
    for r in sel:  # base and peft: the ones timed beside the bank of n_max where they were timed together
        if (r["strategy"] in ("base", "peft") and r.get("alongside") in (None, n_max)) or r["num_adapters"] == n_max:
            bench_at[_canon(r["strategy"])] = r
    labels = list(dict.fromkeys([_canon(s) for s in ev] + list(bench_at)))
    ev_c = {_canon(k): v for k, v in ev.items()}
    bench = next((r for r in records if r["stage"] == "bench"), None)
    rows = []
    for s in labels:
        b = bench_at.get(s)
        rec = ev_c.get(s)
        rows.append({"strategy": s, "avg_score": _num(rec["metrics"].get("main")) if rec else None,
                     "decode_ms": _num(b.get("decode_ms_per_token")) if b else None,
                     "peak_mem_gb": _num(b.get("peak_mem_gb")) if b else None,
                     "runs": _runs({"avg_score": rec, "decode_ms": bench if b else None})})
    composite = [{"n": int(r["composite_n"]), "strategy": _canon(s), "correct": _num(r["metrics"].get("correct")),
                  "attempts": _num(r["metrics"].get("attempts"))} for s, r in comp.items()]
    recs = list(ev_c.values())
    task_metrics = {t: primary_metric(t, recs) for t in _ordered_tasks(recs)}
    out = {"rows": rows, "setting": {**(setting or {}), "num_adapters": n_max}, "composite": composite,
           "task_metrics": {t: m for t, m in task_metrics.items() if m}, "_sources": ev_c}
    rounds = {s: b["rounds"] for s, b in bench_at.items() if b.get("rounds") and b.get("alongside") == n_max}
    if rounds:  # the raw interleaved rounds of the bank of n_max (base, peft and the routers timed together)
        out["rounds"] = rounds
    return out


BUILDERS = {"meteora_tasks": meteora_tasks, "meteora_composite": meteora_composite, "dlp_tasks": dlp_tasks,
            "dlp_latency": dlp_latency, "head_to_head": head_to_head}


# -------------------------------------------------------------------------------------------- provenance
def _one_or_all(values):
    vals = sorted({str(v) for v in values if v is not None})
    return vals[0] if len(vals) == 1 else (vals or None)


def wall_time_s(rec: dict) -> float | None:
    """A record's wall time: its ``wall_time_s`` field, else metrics.json mtime - the run's saved config's mtime
    (StageRun saves the config on entry and metrics.json on finish)."""
    if rec.get("wall_time_s") is not None:
        return float(rec["wall_time_s"])
    path = Path(rec.get("_path", ""))
    start = [p for p in (path.parent / "config.yaml", path.parent / "config_tree.txt") if p.is_file()]
    if not rec.get("_path") or not path.is_file() or not start:
        return None
    return max(0.0, path.stat().st_mtime - min(p.stat().st_mtime for p in start))


def _used_runs(body: dict) -> set[str]:
    """The runs a table's rows (and router / bench fields) name."""
    used = {key for row in body.get("rows", []) for key in (row.get("runs") or {}).values()}
    used |= {(body.get("router") or {}).get("run")}
    return {u for u in used if u}


def run_provenance(rec: dict) -> dict:
    """One run's provenance as a table carries it: git sha, date, wall time, allow_dirty, its own config."""
    p = rec.get("provenance", {})
    return {"stage": rec["stage"], "strategy": rec.get("strategy"), "git_sha": p.get("git_sha"),
            "date": p.get("date"), "wall_time_s": wall_time_s(rec), "allow_dirty": p.get("allow_dirty", False),
            "config": config_of(rec)}


def bigbench_sources(records: list[dict]) -> list:
    """Where each run's BIG-bench task files came from (``provenance.data.bigbench.source``: the pinned sdist, a
    clone and its commit, or the stand-in; None for a run over no task)."""
    return [(((r.get("provenance") or {}).get("data") or {}).get("bigbench") or {}).get("source") for r in records]


def table_provenance(records: list[dict], config: dict | None, used: set[str] | None = None) -> dict:
    """The table's provenance: versions over all its records, each used run's own provenance and config, and the
    report call's config (``report_config``: where the table was written, not how its numbers were made)."""
    prov = [r.get("provenance", {}) for r in records]
    versions = [p.get("versions", {}) for p in prov]
    times = [wall_time_s(r) for r in records]
    runs = {run_key(r): run_provenance(r) for r in records if used is None or run_key(r) in used}
    bigbench = _one_or_all(bigbench_sources(records))  # where the runs' task files came from, when they say
    return {**({"bigbench": bigbench} if bigbench else {}),
            "git_sha": _one_or_all(p.get("git_sha") for p in prov),
            "device": _one_or_all(p.get("device") for p in prov),
            "torch": _one_or_all(v.get("torch") for v in versions),
            "triton": _one_or_all(v.get("triton") for v in versions),
            "transformers": _one_or_all(v.get("transformers") for v in versions),
            "versions": versions[-1] if versions else {},
            "by_run": dict(sorted(runs.items())),
            "report_config": config or {},
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "runs": [min((p.get("date") for p in prov if p.get("date")), default=None),
                     max((p.get("date") for p in prov if p.get("date")), default=None)],
            "wall_time_s": round(sum(t for t in times if t is not None), 1),
            "records": len(records)}


# ---------------------------------------------------------------------------------------------- render
def _md_cell(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, dict):
        return ", ".join(f"{k}: {_md_cell(x)}" for k, x in v.items())
    return str(v)


def _md_table(rows: list[dict], columns=None) -> list[str]:
    if not rows:
        return ["_no rows: the runs this table needs are missing_", ""]
    cols = columns or [c for c in rows[0] if c != "runs"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join(" --- " for _ in cols) + "|"]
    lines += ["| " + " | ".join(_md_cell(r.get(c)) for c in cols) + " |" for r in rows]
    return lines + [""]


def _latency_md_rows(rows):
    out = []
    for r in rows:
        out.append({**r, "dlp/single": _ratio(r["dlp_ms"], r["single_lora_ms"]),
                    "dlp/base": _ratio(r["dlp_ms"], r["base_ms"]),
                    "meteora2/single": _ratio(r["meteora_top2_ms"], r["single_lora_ms"]),
                    "meteora2/base": _ratio(r["meteora_top2_ms"], r["base_ms"])})
    return out


def _split_cell(part: dict) -> str:
    return interval_cell(part["interval"]) if part.get("interval") else _md_cell(part["point"])


def interval_cell(iv: dict | None) -> str:
    """``0.113 [0.081, 0.146]`` (estimate [low, high]), or a dash."""
    if not iv:
        return "–"
    return f"{iv['estimate']:.4g} [{iv['low']:.4g}, {iv['high']:.4g}]"


def router_line(router: dict) -> str:
    """The route stage's router in one line: accuracy, steps, and whether its target accuracy was reached."""
    line = (f"router ({router['run']}): validation routing accuracy {_md_cell(router.get('router_accuracy'))} after "
            f"{router.get('steps')} steps")
    if router.get("train_loras"):
        line += (" trained together with the LoRA weights (router.train.train_loras; its strategies' rows ran on the "
                 "adapters it ended with)")
    if router.get("answers") is not None:
        line += (f"; {_md_cell(router['answers'])} on the answer tokens (where it routes while the model writes), "
                 f"{_md_cell(router['prompts'])} on the prompt tokens")
    if router.get("lm_loss") is not None:
        line += f"; validation LM loss {_md_cell(router['lm_loss'])}"
    if router.get("target_accuracy") is not None:
        reached = router.get("target_reached_step")
        line += (f"; target {_md_cell(router['target_accuracy'])} "
                 + (f"reached at step {reached}" if reached is not None else "not reached"))
    if router.get("ceiling") is not None:
        line += (f"; the most a causal token router can score on these validation rows (their shared prefixes): "
                 f"{_md_cell(router['ceiling'])}")
    if router.get("one_token") is not None:
        line += (f"; a router reading one token (a layer-0 q / k / v gate's view) scores "
                 f"{_md_cell(router['one_token'])} there")
    if router.get("stopped_by") not in (None, "target"):
        line += f"; stopped by {router['stopped_by']}"
    if router.get("curve"):
        line += "; validation curve (step: accuracy) " + ", ".join(f"{s}: {_md_cell(a)}" for s, a in router["curve"])
    return line


def paper_markdown(name: str, table: dict, plot: Path | None, title: str | None = None) -> str:
    p = table["provenance"]
    head = (f"git `{p['git_sha']}` · {p['device']} · torch {p['torch']} · triton {p['triton']} · "
            f"transformers {p['transformers']} · {p['date']} · {p['records']} runs, {p['wall_time_s']} s")
    if p.get("bigbench"):
        head += f" · BIG-bench: {p['bigbench']}"
    heading = name if title in (None, name) else f"{title} (paper table {name})"
    lines = [f"# {heading}", "", head, "", "## Claims", ""]
    claims = [{**c, "95% interval": interval_cell(c.get("interval")), "holds (point)": c["holds"]}
              for c in table["claims"]]
    lines += _md_table(claims, ["claim", "measured", "threshold", "holds (point)", "95% interval", "verdict",
                                "reason"])
    for c in table["claims"]:
        if c.get("gap_split"):
            sp = c["gap_split"]
            text = (f"The gap of claim {c['claim'].split('.')[0]}, split (the oracle over the adapters the gates "
                    f"were trained with averages {_md_cell(sp['peft_cotrained_avg'])}): the adapters' change "
                    f"(peft - peft_cotrained) {_split_cell(sp['adapters'])}, the routing (peft_cotrained - "
                    f"meteora_top2) {_split_cell(sp['routing'])}.")
            if sp.get("gates_on_finetuned"):
                text += (f" The same gates over the adapters as fine-tuned (meteora_top2_frozen, averaging "
                         f"{_md_cell(sp['meteora_top2_frozen_avg'])}) leave a gap (peft - meteora_top2_frozen) of "
                         f"{_split_cell(sp['gates_on_finetuned'])}.")
            lines += [text, ""]
    lines += ["## Rows", ""]
    if name == "dlp_latency":
        lines += [f"setting: {_md_cell(table.get('setting'))}; ratios are ms over ms", ""]
        if table.get("grouped"):
            lines += ["decoded through the bank's projection groups (`bench.group_projections`): "
                      + ", ".join(f"{s} {v}" for s, v in table["grouped"].items()), ""]
        lines += _md_table(_latency_md_rows(table["rows"]))
        for engine, other in table.get("other_engines", {}).items():
            lines += [f"### engine {engine} ({_md_cell(other['setting'])})", ""]
            lines += _md_table(_latency_md_rows(other["rows"]))
    else:
        lines += _md_table(table["rows"])
    if table.get("averages"):
        lines += ["averages: " + ", ".join(f"{k} {_md_cell(v)}" for k, v in table["averages"].items()), ""]
    if table.get("router"):
        lines += [router_line(table["router"]), ""]
    if name == "meteora_composite":
        lines += ["### attempts and correct", ""] + _md_table(table["per_n"])
    if name == "dlp_tasks":
        acc = (f"router_accuracy (validation): {_md_cell(table['router_accuracy'])}; on the test prompts: "
               f"{_md_cell(table['router_accuracy_test'])}")
        lines += [acc, ""]
    if name == "head_to_head" and table.get("composite"):
        lines += [f"setting: {_md_cell(table.get('setting'))}", "", "### composite", ""] + _md_table(table["composite"])
    if plot is not None:
        lines += [f"![{name}]({plot.name})", ""]
    runs = [{"run": k, **{f: v.get(f) for f in ("stage", "strategy", "git_sha", "date", "wall_time_s")}}
            for k, v in (p.get("by_run") or {}).items()]
    if runs:
        lines += ["## Runs (each run's own config is in the JSON)", ""] + _md_table(runs)
    return "\n".join(lines)


def plot_table(name: str, table: dict, path: Path) -> Path | None:
    """The paper's figure: per-task radar (meteora_tasks), composite bars per n, latency vs adapters."""
    rows = table["rows"]
    if not rows:
        return None
    if name == "meteora_tasks":
        cols = [c for c in (*METEORA_TASK_COLUMNS, *METEORA_TASK_OPTIONAL) if c in rows[0]]
        t = Table(name, "MeteoRA per-task", ["task", *cols],
                  [[r["task"], *[_unit(r["metric"], r[c]) for c in cols]] for r in rows])
        return radar_plot(t, path)
    if name == "meteora_composite":
        ns = sorted({r["n"] for r in rows})
        t = Table(name, f"composite-{'/'.join(map(str, ns))}: MeteoRA vs LoRA-B per sub-task",
                  ["sub-task", "meteora", "lora_b"],
                  [[f"{r['subtask']} (n={r['n']})", _unit(r["metric"], r["meteora"]), _unit(r["metric"], r["lora_b"])]
                   for r in rows])
        return bar_plot(t, path)
    if name == "dlp_latency":
        return latency_figure(rows, path)
    return None


def latency_figure(rows: list[dict], path: Path) -> Path | None:
    """DLP-LoRA's figure: ms vs number of adapters per model and phase; base and single LoRA as reference lines."""
    models = list(dict.fromkeys(r["model"] for r in rows))
    plt = pyplot()
    fig, axes = plt.subplots(len(models), 2, figsize=(10, 3.6 * len(models)), squeeze=False)
    for i, model in enumerate(models):
        for j, phase in enumerate(("prefill", "decode")):
            ax = axes[i][j]
            sel = sorted((r for r in rows if r["model"] == model and r["phase"] == phase), key=lambda r: r["n_adapters"])
            ns = [r["n_adapters"] for r in sel]
            for col, style in (("dlp_ms", "o-"), ("meteora_top2_ms", "s-")):
                pts = [(n, r[col]) for n, r in zip(ns, sel) if r[col] is not None]
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=col[:-3])
            for col, color in (("base_ms", "gray"), ("single_lora_ms", "black")):
                if sel and sel[0][col] is not None:
                    ax.axhline(sel[0][col], linestyle="--", color=color, label=col[:-3])
            adapter_axis(ax, ns)
            ax.set_ylabel("ms (prefill, whole batch)" if phase == "prefill" else "ms / token")
            ax.set_title(f"{model}: {phase}")
            ax.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path)


def build_paper_table(name: str, records: list[dict], config: dict | None = None, **options) -> dict:
    """The JSON payload of paper table ``name`` from an experiment's records (no files written)."""
    if name not in BUILDERS:
        raise ValueError(f"paper table {name!r} is not known; use one of {', '.join(PAPER_TABLES)}")
    records = latest_records(records)
    body = BUILDERS[name](records, **options)
    body["claims"] = table_claims(name, body)
    used = _used_runs(body)
    body = {k: v for k, v in body.items() if not k.startswith("_")}
    return {"table": name, "provenance": table_provenance(records, config, used), **body}


def write_paper_table(name: str, records: list[dict], out_dir, config: dict | None = None,
                      file_name: str | None = None, **options) -> dict:
    """Write ``<out_dir>/<file_name or name>.json``, ``.md`` and (where the paper has a figure) ``.png``; return
    their paths. ``file_name`` keeps a variant (another backbone, say) next to the table it reproduces."""
    out = Path(out_dir)
    stem = file_name or name
    table = build_paper_table(name, records, config, **options)
    plot = plot_table(name, table, out / f"{stem}.png")
    paths = {"json": atomic_write_text(out / f"{stem}.json", json.dumps(table, indent=1, allow_nan=False) + "\n"),
             "md": atomic_write_text(out / f"{stem}.md", paper_markdown(name, table, plot, title=stem))}
    if plot is not None:
        paths["png"] = plot
    return paths


def claims_summary(table: dict) -> str:
    """One line per claim: its verdict by the interval (or why there is none) and the point estimate's side."""
    word = {True: "holds", False: "fails", None: "not measured"}
    out = []
    for c in table.get("claims", []):
        v = c.get("verdict") or f"no verdict ({c.get('reason')})"
        out.append(f"{v}: {c['claim']} [point estimate {word[c['holds']]}; 95% interval "
                   f"{interval_cell(c.get('interval'))}]")
    return "\n".join(out)


__all__ = ["PAPER_TABLES", "build_paper_table", "claims_summary", "write_paper_table"]
