"""The papers' claims, computed from a paper table's rows (point estimates) and, where the table's evaluate records
are at hand, from their per-row predictions (paired bootstrap intervals and verdicts, ``pipeline.report.statistics``).

    claims = table_claims("meteora_tasks", body)       # body: a table's rows + fields (+ "_sources": records)

Each claim is ``{claim, measured, threshold, holds, interval, verdict, reason}``:

* ``measured``: the numbers the claim is about, recomputed from the table's rows (so a test can recompute the
  claims of every committed table from its rows alone and compare);
* ``holds``: the point estimate's side of the threshold (True / False, None when not measured);
* ``interval``: the 95% paired bootstrap interval of the claim's statistic (``Interval.to_dict``), None without
  per-row records (a table rebuilt from rows alone) or for timings (medians of repeats: no rows to resample);
* ``verdict``: ``yes`` / ``no`` / ``inconclusive`` by the interval, or by the point estimate for timings; None
  when untestable, ``reason`` says why (no per-row records; every row 0 on both sides; a composite run whose
  model answers fewer than 0.8 n of the n questions, so the comparison measures the answer format).

``body["_sources"]`` maps a column to the evaluate record behind it (``{"peft": rec, ...}``; composite:
``{n: {"meteora": rec, "lora_b": rec}}``; dlp_tasks adds ``"router_hits"``, one 0/1 per test prompt).
"""

from __future__ import annotations

import numpy as np

from pipeline.report.claim_rows import paired, record_rows
from pipeline.report.statistics import (
    Side,
    majority_verdict,
    mean_difference,
    median_interval,
    median_verdict,
    paired_time_ratios,
    point_holds,
    round_time_ratios,
    unit,
    verdict,
)

NO_RECORDS = "no per-row records: point estimate only"
TIMING = "point estimate: timings are medians of the bench repeats, no rows to resample"
MIN_ATTEMPTS = 0.8  # composite: answers per row below this share of n make the comparison untestable


def _mean(vals):
    vals = [v for v in vals if v is not None]
    return round(sum(vals) / len(vals), 6) if vals else None


def claim(text: str, measured, threshold: str, holds, iv=None, bar: float | None = None, side: str = "<=",
          why: str = NO_RECORDS, fixed: tuple | None = None, interval: dict | None = None) -> dict:
    """One claim dict; the verdict from ``iv`` against ``bar`` (``fixed``: a (verdict, reason) decided elsewhere,
    with the ``interval`` it was decided by, when it was not a bootstrap's)."""
    if fixed is not None:
        v, reason = fixed
    elif holds is None:
        v, reason = None, "not measured: the runs this claim needs are missing"
    else:
        v, reason = verdict(iv, bar, side, why_none=why)
    return {"claim": text, "measured": measured, "threshold": threshold,
            "holds": None if holds is None else bool(holds),
            "interval": iv.to_dict() if iv is not None else interval,
            "verdict": v, "reason": reason}


def _difference(sources: dict, a: str, b: str | None, metrics: dict[str, str]):
    """The paired interval of mean(score_a - score_b) over ``metrics``' tasks, or None without the records."""
    if a not in sources or (b is not None and b not in sources) or not metrics:
        return None
    sides = paired(record_rows(sources[a]), record_rows(sources[b]) if b is not None else None, metrics)
    return mean_difference(*sides) if sides else None


# ------------------------------------------------------------------------------------------------ claims
def meteora_tasks_claims(body: dict) -> list[dict]:
    rows, src = body["rows"], body.get("_sources", {})
    avg = {col: _mean(unit(r["metric"], r.get(col)) if r.get(col) is not None else None for r in rows)
           for col in ("peft", "meteora_top2")}
    gap = None if None in avg.values() else round(avg["peft"] - avg["meteora_top2"], 6)
    metrics = {r["task"]: r["metric"] for r in rows if r.get("peft") is not None and r.get("meteora_top2") is not None}
    iv = _difference(src, "peft", "meteora_top2", metrics) if len(metrics) == len(rows) else None
    measured = {"meteora_top2_avg": avg["meteora_top2"], "peft_avg": avg["peft"], "peft_minus_top2": gap,
                "tasks": len(rows)}
    out = claim("1. MeteoRA top-2 average within 2 points of the PEFT oracle average (paper: comparable)",
                measured, "peft_avg - meteora_top2_avg <= 0.02", point_holds(gap, 0.02, "<="), iv, 0.02, "<=")
    if all(r.get("peft_cotrained") is not None for r in rows) and gap is not None:
        out["gap_split"] = _gap_split(rows, src, metrics, avg)
    return [out]


def _gap_split(rows: list[dict], src: dict, metrics: dict, avg: dict) -> dict:
    """Where gates trained together with the adapters ran on changed adapters (the ``peft_cotrained`` column: the
    oracle over those), the oracle-to-top-2 gap is the adapters' change (peft - peft_cotrained) plus the routing
    (peft_cotrained - meteora_top2), each with its paired interval; where MeteoRA top-2 also ran with those gates
    over the adapters as fine-tuned (``meteora_top2_frozen``), the gap that leaves (``gates_on_finetuned``: peft -
    meteora_top2_frozen) too."""
    cot = _mean(unit(r["metric"], r["peft_cotrained"]) for r in rows)
    whole = len(metrics) == len(rows)
    parts = {"adapters": ("peft", "peft_cotrained", avg["peft"] - cot),
             "routing": ("peft_cotrained", "meteora_top2", cot - avg["meteora_top2"])}
    out = {"peft_cotrained_avg": cot}
    if all(r.get("meteora_top2_frozen") is not None for r in rows):  # the gates over the adapters as fine-tuned
        frozen = _mean(unit(r["metric"], r["meteora_top2_frozen"]) for r in rows)
        out["meteora_top2_frozen_avg"] = frozen
        parts["gates_on_finetuned"] = ("peft", "meteora_top2_frozen", avg["peft"] - frozen)
    for name, (a, b, point) in parts.items():
        iv = _difference(src, a, b, metrics) if whole else None
        out[name] = {"point": round(point, 6), "interval": iv.to_dict() if iv is not None else None}
    return out


def _composite_n(n: int, rows: list[dict], attempts: dict, src: dict, silent: dict | None = None) -> dict:
    """One n of claim 2: point wins, per-sub-task intervals, and the verdict (None when untestable). ``silent``: per
    side, the rows that ran their whole budget writing no text (only special tokens or whitespace), where recorded."""
    both = [r for r in rows if r.get("meteora") is not None and r.get("lora_b") is not None]
    wins = sum(r["meteora"] > r["lora_b"] for r in both)
    out = {"wins": f"{wins}/{len(both)}", "attempts": attempts}
    low = {side: a for side, a in attempts.items() if a is not None and a < MIN_ATTEMPTS * n}
    # a side with no run at this n (its evaluation failed or was not planned: no attempts and no score in any row),
    # said, so a "–" column is explained
    absent = "".join(f"; {side}: no run at this n" for side, a in sorted(attempts.items())
                     if a is None and all(r.get(side) is None for r in rows))
    if low:
        loops = {side: k for side, k in (silent or {}).items() if side in low and k}
        why = ("; " + ", ".join(f"{side}: {k:g} rows ran their whole budget writing no text (only special tokens or "
                                "whitespace)"
                                for side, k in sorted(loops.items()))) if loops else ""
        out.update(verdict=None, untestable=True, reason=", ".join(f"{side} attempts {a:.2f} < {MIN_ATTEMPTS} n = {MIN_ATTEMPTS * n:g}"
                                                  for side, a in sorted(low.items())) +
                   ": the model does not answer the numbered list, so the comparison measures the answer format" + why +
                   absent)
        return out
    ivs = []
    for r in both:
        iv = _difference(src, "meteora", "lora_b", {r["subtask"]: r["metric"]})
        if iv is None:
            out.update(verdict=None, reason=NO_RECORDS)
            return out
        ivs.append(iv)
    v, counts = majority_verdict(ivs)
    out.update(counts, verdict=v, reason=None if v else "no sub-task has both sides scored" + absent)
    return out


def meteora_composite_claims(body: dict) -> list[dict]:
    rows, per_n, src = body["rows"], body.get("per_n", []), body.get("_sources", {})
    by_n = {}
    for n in sorted({r["n"] for r in rows}):
        attempts, silent = ({side: next((p[side] for p in per_n if p["n"] == n and p["measure"] == measure), None)
                             for side in ("meteora", "lora_b")} for measure in ("attempts", "no_text_at_budget"))
        by_n[n] = _composite_n(n, [r for r in rows if r["n"] == n], attempts, src.get(n, src.get(str(n), {})), silent)
    totals = {n: [r for r in rows if r["n"] == n and r.get("meteora") is not None and r.get("lora_b") is not None]
              for n in by_n}
    # the point comparison, except where an n is untestable (too few attempts: its scores measure the answer format)
    holds = all(len(t) > 0 and sum(r["meteora"] > r["lora_b"] for r in t) > len(t) / 2 for t in totals.values()) \
        if by_n and not any(b.get("untestable") for b in by_n.values()) else None
    verdicts = [b["verdict"] for b in by_n.values()]
    if "no" in verdicts:
        fixed = ("no", None)
    elif None in verdicts:
        fixed = (None, "; ".join(f"composite-{n}: {b['reason']}" for n, b in by_n.items() if b["verdict"] is None))
    else:
        fixed = ("yes", None) if verdicts and all(v == "yes" for v in verdicts) else ("inconclusive", None)
    c = claim("2. MeteoRA beats LoRA-B on most sub-tasks of composite-3, -5 and -10 (paper: 8 of 10 at n=10)",
              {f"composite-{n}": b["wins"] for n, b in by_n.items()},
              "meteora > lora_b on more than half the sub-tasks, for every n (by each sub-task's interval)", holds,
              fixed=fixed if by_n else None)
    c["by_n"] = {str(n): b for n, b in by_n.items()}
    return [c]


def dlp_tasks_claims(body: dict) -> list[dict]:
    rows, src = body["rows"], body.get("_sources", {})
    test_acc, val_acc = body.get("router_accuracy_test"), body.get("router_accuracy")
    acc = test_acc if test_acc is not None else val_acc
    hits = src.get("router_hits")
    iv3 = mean_difference({"router": Side("accuracy", np.array([[float(h), 1.0] for h in hits]))}) if hits else None
    mcq = [r for r in rows if r["kind"] == "mcq"]
    avg = {col: _mean(r.get(col) for r in mcq) for col in ("base", "single_lora", "dlp")}
    gap = None if avg["dlp"] is None or avg["single_lora"] is None else round(avg["single_lora"] - avg["dlp"], 6)
    metrics = {r["task"]: "accuracy" for r in mcq if r.get("single_lora") is not None and r.get("dlp") is not None}
    iv4 = _difference(src, "single_lora", "dlp", metrics) if len(metrics) == len(mcq) else None
    return [
        claim("3. DLP router task-identification accuracy at least 98% (paper: 98.45%)",
              {"router_accuracy_test": test_acc, "router_accuracy_val": val_acc},
              ">= 0.98 (test routes where saved, else validation)", point_holds(acc, 0.98, ">="), iv3, 0.98, ">=",
              why="no per-prompt routes in the records" if test_acc is None else NO_RECORDS),
        claim("4. DLP average MCQ accuracy at least the single-LoRA average minus 1 point (paper: -0.35)",
              {"dlp_mcq_avg": avg["dlp"], "single_lora_mcq_avg": avg["single_lora"], "base_mcq_avg": avg["base"],
               "single_minus_dlp": gap, "mcq_tasks": len(mcq)}, "single_lora_avg - dlp_avg <= 0.01",
              point_holds(gap, 0.01, "<="), iv4, 0.01, "<=")]


def _ratio(a, b):
    return None if a is None or not b else round(a / b, 4)


def _timing_claim(text: str, per_round: list[float], threshold: str, bar: float, what: str,
                  measured: dict | None = None) -> dict:
    """A timing claim "median ratio <= bar" over interleaved rounds (``per_round``: one ratio per round), decided by
    ``median_interval`` (order statistics: timings have no rows to resample); ``what`` says what a round's value
    is, ``measured`` adds fields beside ``median_ratio`` and ``rounds``."""
    iv = median_interval(per_round)
    med = round(iv["median"], 4)
    return claim(text, {"median_ratio": med, "rounds": len(per_round), **(measured or {})}, threshold, med <= bar,
                 fixed=(median_verdict(iv, bar),
                        (f"{iv['coverage']:.1%} interval of the median of {len(per_round)} {what} (order "
                         "statistics; timings have no rows to resample)")),
                 interval={"estimate": med, "low": round(iv["low"], 4), "high": round(iv["high"], 4),
                           "level": round(iv["coverage"], 4), "method": "order statistics", "rows": len(per_round)})


def dlp_latency_claims(body: dict) -> list[dict]:
    """Claim 5 from DLP-LoRA's latency table: DLP over peft's single LoRA and MeteoRA top-2 over the base model, the
    mean over the bank sizes. Where the table keeps its rounds (each bank size timed together with base and peft),
    a round's value is that mean of paired ratios and the verdict is by the median of the rounds' interval (as
    ``e2e_decode_claims``); a table without rounds gives the point estimate of the medians' ratios."""
    rows, setting = body["rows"], body.get("setting") or {}
    models = list(dict.fromkeys(r["model"] for r in rows))
    model = body.get("claim_model") or "llama3_8b"
    model = model if model in models else next((m for m in models if m.startswith("llama3_8b")),
                                                models[-1] if models else None)
    dec = [r for r in rows if r["model"] == model and r["phase"] == "decode"]
    engine = setting.get("engine")
    rounds = (body.get("rounds") or {}).get(model) or {}
    out = []
    for label, col, ref_col, strategy, ref, bar, paper in (
            ("5a", "dlp_ms", "single_lora_ms", "dlp", "peft", 1.2, "paper: < 2x, 1.18 mean"),
            ("5b", "meteora_top2_ms", "base_ms", "meteora-top2", "base", 1.3, "paper: about 2x single LoRA")):
        who = {"dlp": "DLP", "meteora-top2": "MeteoRA top-2"}[strategy]
        whom = {"peft": "single LoRA", "base": "the base model"}[ref]
        text = f"{label}. decode with {who} at most {bar}x {whom} on {model} ({paper})"
        groups = {int(n): round_time_ratios(g[strategy], g[ref]) for n, g in rounds.items() if strategy in g and ref in g}
        if groups:
            width = min(len(v) for v in groups.values())
            per_round = [float(np.mean([groups[n][i] for n in groups])) for i in range(width)
                         if all(groups[n][i] is not None for n in groups)]
            if per_round:
                by_n = {n: round(float(np.median([v for v in groups[n] if v is not None])), 4) for n in sorted(groups)}
                out.append(_timing_claim(
                    text, per_round, f"per round, the mean over adapter counts of {strategy} / {ref} decode ms; "
                    f"its median <= {bar}", bar, "interleaved rounds (each the mean over adapter counts of paired "
                    "ratios)", {"by_n_adapters": by_n, "engine": engine}))
                continue
        by = {r["n_adapters"]: _ratio(r[col], r[ref_col]) for r in dec}
        mean = _mean(by.values())
        holds = point_holds(mean, bar, "<=")
        fixed = (None if holds is None else ("yes" if holds else "no"), TIMING if holds is not None else
                 "not measured: the bench rows this claim needs are missing")
        out.append(claim(text, {"mean_ratio": mean, "by_n_adapters": by, "engine": engine},
                         f"mean over adapter counts of {col} / {ref_col} <= {bar}", holds, fixed=fixed))
    return out


def head_to_head_claims(body: dict) -> list[dict]:
    by = {r["strategy"]: r for r in body["rows"]}
    src, metrics = body.get("_sources", {}), body.get("task_metrics") or {}

    def val(s, k):
        return (by.get(s) or {}).get(k)
    d, m, o = val("dlp", "decode_ms"), val("meteora-top2", "decode_ms"), val("oracle", "avg_score")
    t2, dl = val("meteora-top2", "avg_score"), val("dlp", "avg_score")
    speed = point_holds(None if d is None or m is None else d - m, 0.0, "<=")
    gap2 = None if o is None or t2 is None else o - t2
    gapd = None if o is None or dl is None else o - dl
    text = "DLP (sentence routing) decodes at most as slowly as MeteoRA top-2 (token routing)"
    rounds = body.get("rounds") or {}
    per = paired_time_ratios(rounds["dlp"], rounds["meteora-top2"]) if {"dlp", "meteora-top2"} <= rounds.keys() else []
    fast = (_timing_claim(text, per, "dlp / meteora-top2 decode ms <= 1", 1.0, "paired rounds",
                          {"dlp_decode_ms": d, "meteora_top2_decode_ms": m}) if per else
            claim(text, {"dlp_decode_ms": d, "meteora_top2_decode_ms": m}, "dlp <= meteora-top2", speed,
                  fixed=(None if speed is None else ("yes" if speed else "no"), TIMING)))
    return [
        fast,
        claim("MeteoRA top-2 average within 2 points of the oracle on the same adapters",
              {"meteora_top2": t2, "oracle": o}, "oracle - meteora_top2 <= 0.02", point_holds(gap2, 0.02, "<="),
              _difference(src, "oracle", "meteora-top2", metrics), 0.02, "<="),
        claim("DLP average within 1 point of the oracle on the same adapters",
              {"dlp": dl, "oracle": o}, "oracle - dlp <= 0.01", point_holds(gapd, 0.01, "<="),
              _difference(src, "oracle", "dlp", metrics), 0.01, "<=")]


def e2e_decode_claims(doc: dict) -> list[dict]:
    """Claim 5 from the whole-model decode table (``e2e_decode.json``: its raw per-round records), under the
    engines that decode through CUDA graphs (``static+compile``: static KV cache, compiled decode step;
    ``static+graph``: the decode step captured as one graph, evaluate's engine), for every (targets, batch) it
    measured: DLP with a realistic 2-adapter nucleus at most 1.2x peft's single LoRA, MeteoRA top-2 at most 1.3x
    the base model; each strategy as it is and with grouped projections (``+grouped``), each where the record timed it.
    The measured ratio is the median over interleaved rounds, paired (same round); the verdict is by a
    distribution-free interval of that median (``median_interval``: order statistics, 95% or more; min..max below 6
    rounds), as timings have no rows to resample. A record that timed neither
    form of a strategy gives one untestable row for it, as does a form timed without its reference."""
    out = []
    records = [r for r in doc.get("records", []) if r["engine"] in ("static+compile", "static+graph")]
    model = (doc.get("config") or {}).get("shape", "llama3_8b")
    engine_words = {"static+compile": "static cache + compile", "static+graph": "static cache + CUDA graph"}
    for label, strategy, ref, bar, paper in (("5a", "dlp-nucleus2", "peft", 1.2, "paper: < 2x, 1.18 mean"),
                                             ("5b", "meteora-top2", "base", 1.3, "paper: about 2x single LoRA")):
        for rec in records:
            timed = [m for m in (strategy, strategy + "+grouped") if m in rec["rounds"]]
            for mine in timed or [strategy]:  # neither timed in this record: one untestable row says so
                text = (f"{label}. decode with {mine} at most {bar}x {ref} on {model}, {rec['targets']}, batch "
                        f"{rec['batch_size']}, {engine_words[rec['engine']]} ({paper})")
                a, b = rec["rounds"].get(mine), rec["rounds"].get(ref)
                per = paired_time_ratios(a, b) if a and b else []
                if not per:
                    out.append(claim(text, None, f"{mine} / {ref} decode ms <= {bar}", None))
                    continue
                out.append(_timing_claim(text, per, f"{mine} / {ref} decode ms <= {bar}", bar, "paired rounds"))
    return out


CLAIMS = {"meteora_tasks": meteora_tasks_claims, "meteora_composite": meteora_composite_claims,
          "dlp_tasks": dlp_tasks_claims, "dlp_latency": dlp_latency_claims, "head_to_head": head_to_head_claims,
          "e2e_decode": e2e_decode_claims}


def table_claims(name: str, body: dict) -> list[dict]:
    """The claims of paper table ``name`` from its body (rows + fields, and ``_sources`` when records are at hand)."""
    return CLAIMS[name](body)


__all__ = ["CLAIMS", "MIN_ATTEMPTS", "NO_RECORDS", "TIMING", "claim", "table_claims"]
