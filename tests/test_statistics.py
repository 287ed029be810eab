"""Paired bootstrap intervals and verdicts (pipeline.report.statistics, pipeline.report.paper_claims) on synthetic records: real
metrics.json + predictions.jsonl files written by the stages' own writer, scored by the real metric modules."""

from __future__ import annotations

import numpy as np
import pytest

from data.scoring import from_stats, row_stats, score
from pipeline.report.paper_tables import build_paper_table
from pipeline.report.statistics import Interval, Side, majority_verdict, mean_difference, verdict
from pipeline.runtime.metrics_file import write_metrics
from pipeline.stages.report import collect_records

N = 1000


def _rouge_rows(f: float, n: int = 200) -> Side:
    return Side("rougeL", np.array([[f, 1.0]] * n))


def test_threshold_is_decided_by_the_interval_exactly():
    """Every row differs by the same amount: the interval is that amount, and 0.019 / 0.021 fall either side of
    the 2-point bar (a tie with the bar counts as on the claim's side)."""
    for gap, want in ((0.019, "yes"), (0.021, "no"), (0.02, "yes")):
        iv = mean_difference({"t": _rouge_rows(0.5)}, {"t": _rouge_rows(0.5 - gap)})
        assert iv.low == pytest.approx(gap) and iv.high == pytest.approx(gap) and iv.estimate == pytest.approx(gap)
        assert verdict(iv, 0.02, "<=") == (want, None)
    wide = Interval(0.019, 0.01, 0.03, 0.95, 10, 0, 100)
    assert verdict(wide, 0.02, "<=") == ("inconclusive", None)
    assert verdict(wide, 0.005, ">=") == ("yes", None) and verdict(wide, 0.04, ">=") == ("no", None)
    assert verdict(None, 0.02, "<=") == (None, "no per-row records")


def test_interval_is_seeded_paired_and_about_the_right_width():
    rng = np.random.default_rng(1)
    hits_a = (rng.random(400) < 0.5).astype(float)
    a = {"t": Side("accuracy", np.stack([hits_a, np.ones(400)], 1))}
    iv = mean_difference(a)
    assert iv == mean_difference(a) and iv != mean_difference(a, seed=1)
    half = (iv.high - iv.low) / 2
    assert 0.04 < half < 0.06  # 1.96 * sqrt(0.25 / 400) = 0.049
    # paired: the same hits on both sides give a zero-width interval however noisy the hits are
    same = mean_difference(a, a)
    assert same.low == same.high == same.estimate == 0.0


def test_clustered_rows_are_drawn_together_and_widen_the_interval_as_fewer_independent_rows():
    """``Side.clusters``: 30 questions each asked in 10 rows (a composite sub-task cycled over 300 rows) carry the
    information of 30 rows, not 300: the clustered interval is about sqrt(10) times the row bootstrap's, a
    one-row-per-cluster table gives the row bootstrap's interval back, and the point estimate does not move."""
    rng = np.random.default_rng(2)
    hits = np.repeat((rng.random(30) < 0.5).astype(float), 10)  # question q's answer in rows 10q .. 10q + 9
    stats = np.stack([hits, np.ones(300)], 1)
    rows = mean_difference({"t": Side("accuracy", stats)})
    clustered = mean_difference({"t": Side("accuracy", stats, np.repeat(np.arange(30), 10))})
    assert clustered.estimate == rows.estimate
    ratio = (clustered.high - clustered.low) / (rows.high - rows.low)
    assert 2.4 < ratio < 4.2  # sqrt(10) = 3.16
    single = mean_difference({"t": Side("accuracy", stats, np.arange(300))})
    assert (single.high - single.low) == pytest.approx(rows.high - rows.low, rel=0.15)
    # paired: both sides drawn by the same clusters
    other = np.stack([np.repeat((rng.random(30) < 0.5).astype(float), 10), np.ones(300)], 1)
    ids = np.repeat(np.arange(30), 10)
    paired_iv = mean_difference({"t": Side("accuracy", stats, ids)}, {"t": Side("accuracy", other, ids)})
    assert paired_iv.low <= paired_iv.estimate <= paired_iv.high


def test_row_stats_sum_to_the_metrics_score_reports():
    preds = ["yes. the cat sat on the mat", "", "No, it is not", "maybe", "Yes. A dog barked loudly today"]
    golds = ["Yes. The cat sat on a mat.", "No. x", "No. it is not so", "Yes. y", "Yes. A dog barked loudly."]
    whole, rows = score("strategyqa", preds, golds), row_stats("strategyqa", preds, golds)
    assert set(rows) == {"accuracy", "bleu", "rouge1", "rouge2", "rougeL"}
    for metric, stats in rows.items():
        assert stats.shape[0] == len(preds)
        assert from_stats(metric, stats.sum(0)) == pytest.approx(whole[metric], abs=1e-9), metric
    # a subset of rows is that subset's score (what a resample computes)
    keep = [0, 2, 4]
    sub = score("strategyqa", [preds[i] for i in keep], [golds[i] for i in keep])
    assert from_stats("bleu", rows["bleu"][keep].sum(0)) == pytest.approx(sub["bleu"], abs=1e-9)


# ----------------------------------------------------------------------------------- synthetic records
def _write_run(root, step: str, task: str, preds: list[str], golds: list[str], strategy: str, composite=None,
               extra_metrics=None, sources=None):
    import json

    run = root / "evaluate" / step
    run.mkdir(parents=True)
    if composite:
        lines = [{"index": i, "prompt": f"q{i}", "answers": g, "prediction": p,
                  **({"sources": sources[i]} if sources else {})} for i, (p, g) in enumerate(zip(preds, golds))]
        from data.composite import parse_composite

        metrics = {}
        for j, sub in enumerate(composite):
            m = score(sub, [parse_composite(p, len(composite))[j] for p in preds], [g[j] for g in golds])
            metrics.update({f"{sub}/{k}": v for k, v in m.items()})
        empties = sum(not a.strip() for p in preds for a in parse_composite(p, len(composite)))
        metrics["attempts"] = len(composite) - empties / len(preds)
        tasks = list(composite)
    else:
        lines = [{"task": task, "index": i, "prompt": f"q{i}", "answer": g, "prediction": p}
                 for i, (p, g) in enumerate(zip(preds, golds))]
        metrics = {f"{task}/{k}": v for k, v in score(task, preds, golds).items()}
        tasks = [task]
    metrics.update(extra_metrics or {})
    (run / "predictions.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    write_metrics(run, stage="evaluate", experiment="synthetic", tasks=tasks, strategy=strategy, metrics=metrics,
                  provenance={"git_sha": "0" * 40, "date": "2026-01-01T00:00:00+00:00"},
                  extra={"composite_n": len(composite) if composite else None, "wall_time_s": 1.0})


def _gap_table(tmp_path, oracle_hits: int, top2_hits: int) -> dict:
    golds = ["correct"] * N
    for step, strategy, hits in (("oracle", "oracle", oracle_hits), ("top2", "meteora-top2", top2_hits)):
        preds = ["correct"] * hits + ["incorrect"] * (N - hits)
        _write_run(tmp_path, step, "winowhy", preds, golds, strategy)
    return build_paper_table("meteora_tasks", collect_records(tmp_path))


@pytest.mark.parametrize(("oracle", "top2", "holds", "verdict_"), [
    (600, 581, True, "inconclusive"),   # gap 0.019: the point estimate holds, the interval (~ +-0.03) straddles 0.02
    (600, 579, False, "inconclusive"),  # gap 0.021
    (600, 600, True, "yes"),            # tie: the same rows right on both sides, interval [0, 0]
    (900, 500, False, "no"),            # gap 0.4: the whole interval above 0.02
])
def test_claim_1_point_and_interval_verdicts(tmp_path, oracle, top2, holds, verdict_):
    [c] = _gap_table(tmp_path, oracle, top2)["claims"]
    gap = (oracle - top2) / N
    assert c["measured"]["peft_minus_top2"] == pytest.approx(gap)
    assert c["holds"] is holds and c["verdict"] == verdict_
    iv = c["interval"]
    assert iv["estimate"] == pytest.approx(gap) and iv["low"] <= gap <= iv["high"] and iv["rows"] == N
    if verdict_ == "inconclusive":
        assert iv["low"] < 0.02 < iv["high"]


def test_all_zero_is_untestable(tmp_path):
    [c] = _gap_table(tmp_path, 0, 0)["claims"]
    assert c["holds"] is True and c["verdict"] is None and "scores 0" in c["reason"]


def test_composite_ties_are_no_wins_and_few_attempts_are_untestable(tmp_path):
    subs = ["winowhy", "formal_fallacies_syllogisms_negation", "cs_algorithms"]
    golds = [["correct", "valid", "2"]] * 200
    both = "1. correct\n2. valid\n3. 2"
    _write_run(tmp_path, "composite3-meteora-top2", "", [both] * 200, golds, "meteora-top2", subs)
    _write_run(tmp_path, "composite3-lora_b", "", [both] * 200, golds, "lora_b", subs)
    [c] = build_paper_table("meteora_composite", collect_records(tmp_path))["claims"]
    assert c["measured"] == {"composite-3": "0/3"} and c["holds"] is False
    assert c["by_n"]["3"]["verdict"] == "no" and c["by_n"]["3"]["possible_wins"] == 0 and c["verdict"] == "no"

    (tmp_path / "few").mkdir()
    _write_run(tmp_path / "few", "composite3-meteora-top2", "", ["1. correct"] * 200, golds, "meteora-top2", subs)
    _write_run(tmp_path / "few", "composite3-lora_b", "", [both] * 200, golds, "lora_b", subs)
    [c] = build_paper_table("meteora_composite", collect_records(tmp_path / "few"))["claims"]
    assert c["by_n"]["3"]["attempts"]["meteora"] == pytest.approx(1.0)
    assert c["verdict"] is None and "meteora attempts 1.00 < 0.8 n = 2.4" in c["reason"]
    assert "special tokens" not in c["reason"]  # nothing recorded about how rows ended

    (tmp_path / "loop").mkdir()  # every MeteoRA row ran its budget writing no text (special tokens, whitespace)
    _write_run(tmp_path / "loop", "composite3-meteora-top2", "", [""] * 200, golds, "meteora-top2", subs,
               extra_metrics={"no_text_at_budget": 200})
    _write_run(tmp_path / "loop", "composite3-lora_b", "", [both] * 200, golds, "lora_b", subs,
               extra_metrics={"no_text_at_budget": 0})
    t = build_paper_table("meteora_composite", collect_records(tmp_path / "loop"))
    assert [p for p in t["per_n"] if p["measure"] == "no_text_at_budget"] == [
        {"n": 3, "measure": "no_text_at_budget", "meteora": 200, "lora_b": 0}]
    [c] = t["claims"]
    assert c["verdict"] is None and "meteora attempts 0.00" in c["reason"]
    assert "meteora: 200 rows ran their whole budget writing no text" in c["reason"] and "lora_b:" not in c["reason"]

    (tmp_path / "one").mkdir()  # LoRA-B's evaluation did not run (its fine-tune failed): the reason says so
    _write_run(tmp_path / "one", "composite3-meteora-top2", "", ["1. correct"] * 200, golds, "meteora-top2", subs)
    [c] = build_paper_table("meteora_composite", collect_records(tmp_path / "one"))["claims"]
    assert c["verdict"] is None and c["reason"].endswith("meteora attempts 1.00 < 0.8 n = 2.4: the model does not "
                                                         "answer the numbered list, so the comparison measures the "
                                                         "answer format; lora_b: no run at this n")
    (tmp_path / "one_ok").mkdir()  # answered, but nothing to compare with
    _write_run(tmp_path / "one_ok", "composite3-meteora-top2", "", [both] * 200, golds, "meteora-top2", subs)
    [c] = build_paper_table("meteora_composite", collect_records(tmp_path / "one_ok"))["claims"]
    assert c["verdict"] is None and c["by_n"]["3"]["reason"] == ("no sub-task has both sides scored; lora_b: no "
                                                                 "run at this n")


def test_composite_rows_cluster_by_the_question_each_sub_task_asked(tmp_path):
    """A composite record whose lines name their ``sources`` (evaluate writes them): each sub-task's rows are
    clustered by the question they asked, so a sub-task cycled over 30 questions in 300 rows is resampled as 30,
    on both sides of a pair; a record without sources (older ones) is resampled by rows, as before."""
    from pipeline.report.claim_rows import paired, record_rows

    subs = ["winowhy", "cs_algorithms"]
    golds = [["correct", "2"]] * 300
    rng = np.random.default_rng(3)
    right = np.repeat(rng.random(30) < 0.6, 10)  # sub-task 0 cycles 30 questions; sub-task 1 has 300
    preds = [f"1. {'correct' if r else 'incorrect'}\n2. 2" for r in right]
    sources = [[i // 10, i] for i in range(300)]
    _write_run(tmp_path / "new", "composite2-meteora-top2", "", preds, golds, "meteora-top2", subs, sources=sources)
    _write_run(tmp_path / "old", "composite2-meteora-top2", "", preds, golds, "meteora-top2", subs)
    [rec] = collect_records(tmp_path / "new")
    rows = record_rows(rec)
    assert rows["winowhy"].clusters == [i // 10 for i in range(300)] and rows["cs_algorithms"].clusters == list(
        range(300))
    a, b = paired(rows, rows, {"winowhy": "accuracy"})
    assert (a["winowhy"].clusters == b["winowhy"].clusters).all()
    clustered = mean_difference(a)
    [old] = collect_records(tmp_path / "old")
    plain, _ = paired(record_rows(old), record_rows(old), {"winowhy": "accuracy"})
    assert plain["winowhy"].clusters is None
    # one side's record older than the other's: the pair is clustered whichever side names the questions
    for x, y in ((rows, record_rows(old)), (record_rows(old), rows)):
        sx, sy = paired(x, y, {"winowhy": "accuracy"})
        assert sx["winowhy"].clusters.tolist() == sy["winowhy"].clusters.tolist() == rows["winowhy"].clusters
    by_rows = mean_difference(plain)
    assert clustered.estimate == by_rows.estimate == pytest.approx(right.mean())
    assert (clustered.high - clustered.low) > 2.4 * (by_rows.high - by_rows.low)


def test_composite_majority_verdict():
    def iv(lo, hi):
        return Interval((lo + hi) / 2, lo, hi, 0.95, 10, 0, 10)
    assert majority_verdict([iv(0.1, 0.2), iv(0.05, 0.3), iv(-0.1, 0.1)])[0] == "yes"
    assert majority_verdict([iv(0.1, 0.2), iv(-0.05, 0.3), iv(-0.1, 0.1)])[0] == "inconclusive"
    assert majority_verdict([iv(0.1, 0.2), iv(-0.3, -0.1), iv(0.0, 0.0)])[0] == "no"
    assert majority_verdict([])[0] is None


def test_median_interval_is_the_order_statistics_interval():
    """x(k) .. x(n+1-k) with the largest k whose coverage 1 - 2 P(Bin(n, 1/2) <= k-1) is >= 95% (the textbook
    table: n=15 -> 4..12, n=20 -> 6..15, n=30 -> 10..21); below 6 values min..max with its own coverage."""
    from pipeline.report.statistics import median_interval

    for n, (k, cover) in {5: (1, 0.9375), 6: (1, 0.96875), 15: (4, 0.9648), 20: (6, 0.9586), 30: (10, 0.9572)}.items():
        values = [float(v) for v in range(n, 0, -1)]  # unsorted on purpose
        iv = median_interval(values)
        assert (iv["low"], iv["high"], iv["n"]) == (k, n + 1 - k, n), n
        assert abs(iv["coverage"] - cover) < 1e-4 and iv["coverage"] >= (0.95 if n >= 6 else 0.9)
        assert iv["median"] == (n + 1) / 2 and (iv["min"], iv["max"]) == (1, n)
    with pytest.raises(ValueError, match="no values"):
        median_interval([])


def test_median_verdict_by_the_interval_not_the_extremes():
    """15 rounds: one slow round beyond the bar leaves min..max across it, but the interval of the median is
    under it: yes. The verdict flips to inconclusive when the bar cuts the interval, to no when all of it is over."""
    from pipeline.report.statistics import median_interval, median_verdict

    rounds = [1.00, 1.01, 1.02, 1.02, 1.03, 1.03, 1.04, 1.04, 1.05, 1.05, 1.06, 1.07, 1.08, 1.12, 1.30]
    iv = median_interval(rounds)
    assert (iv["low"], iv["high"]) == (1.02, 1.07)
    assert median_verdict(iv, 1.10) == "yes" and median_verdict(iv, 1.07) == "yes"  # touching the bar holds
    assert median_verdict(iv, 1.05) == "inconclusive" and median_verdict(iv, 1.01) == "no"
    assert median_verdict(iv, 1.0, ">=") == "yes" and median_verdict(iv, 1.1, ">=") == "no"
    assert median_verdict(iv, 1.04, ">=") == "inconclusive"
