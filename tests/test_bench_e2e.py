"""The end-to-end decode benchmark (pipeline/stages/e2e_decode.py): its stage on the 8B shape's CPU stand-in writes rows and
verdicts that follow from its raw records, and verdicts follow the paired rounds."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.stages import e2e_decode as e2e

ROOT = Path(__file__).resolve().parent.parent


def _record(engine, rounds, batch=1, targets="all7"):
    return {"engine": engine, "targets": targets, "batch_size": batch, "prompt_len": 128, "new_tokens": 5,
            "num_adapters": 28, "rounds": rounds, "peak_gb": {}}


def test_verdicts_and_rows_follow_the_paired_rounds():
    # decode time per round = t_N - t_1: base 1.0, peft 1.2, oracle 1.05 / 1.25 / 1.15, meteora 2.0
    rec = _record("static+compile", {"base": [(0.1, 1.1)] * 3, "peft": [(0.1, 1.3)] * 3,
                                     "oracle": [(0.1, 1.15), (0.1, 1.35), (0.1, 1.25)],
                                     "meteora-top2": [(0.2, 2.2)] * 3})
    got = {(t["strategy"], t["versus"]): t for t in e2e.verdicts([rec])}
    assert got[("oracle", "peft")]["verdict"] == "inconclusive"  # 0.875..1.042 around 1.0
    assert got[("oracle", "base")]["verdict"] == "inconclusive"  # 1.05..1.25 around 1.10
    assert got[("meteora-top2", "base")]["verdict"] == "no" and got[("meteora-top2", "base")]["ratio"]["min"] == 2.0
    assert got[("dlp-nucleus2", "base")]["verdict"] is None  # not measured: untestable, said so
    grouped = _record("static+graph", {"base": [(0.1, 1.1)] * 3, "oracle+grouped": [(0.1, 1.0)] * 3})
    judged = {(t["strategy"], t["versus"]): t["verdict"] for t in e2e.verdicts([grouped])}
    assert judged[("oracle+grouped", "base")] == "yes" and ("oracle", "base") not in judged  # its variant carries it
    assert judged[("dlp-nucleus2", "base")] is None  # no variant of it ran either: said not measured
    rows = {r["strategy"]: r for r in e2e.rows_from([rec])}
    assert rows["oracle"]["decode_ms_per_token"] == 1000 * 1.15 / 4 and rows["peft"]["num_adapters"] == 1
    assert rows["base"]["prefill_ms"] == 100.0


def test_stage_on_the_cpu_stand_in(tmp_path):
    cmd = [sys.executable, "-m", "pipeline.bench", "experiment=e2e_decode", "print_config=false",
           "bench.shapes=[llama3_8b_tiny]", f"bench.table_dir={tmp_path}", "bench.e2e.targets=[all7]",
           "bench.e2e.engines=[eager,graph]",
           "bench.e2e.strategies=[base,peft,oracle,dlp-nucleus2,oracle+grouped,dlp-nucleus2+grouped,oracle+onelaunch]",
           "bench.e2e.batch_sizes=[2]", "bench.e2e.num_adapters=3", "bench.e2e.new_tokens=3",
           "bench.e2e.prompt_len=6", "bench.e2e.repeats=2", "bench.e2e.profile_calls=[base,dlp-nucleus2+grouped]",
           "bench.e2e.warm_start=true", "bench.e2e.keep_graph=true",
           f"hydra.run.dir={tmp_path / 'run'}"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    doc = json.loads((tmp_path / "e2e_decode.json").read_text())
    assert {r["strategy"] for r in doc["rows"]} == {"base", "peft", "oracle", "dlp-nucleus2", "oracle+grouped",
                                                    "dlp-nucleus2+grouped", "oracle+onelaunch"}
    for s in ("oracle+grouped", "oracle+onelaunch"):
        grouped = [t for t in doc["targets"] if t["strategy"] == s and t["engine"] == "static+graph"]
        assert {t["versus"] for t in grouped} == {"peft", "base"} and all(t["verdict"] is not None for t in grouped)
    assert {r["engine"] for r in doc["rows"]} == {"eager", "static+graph"}
    assert all(len(v) == 2 for rec in doc["records"] for v in rec["rounds"].values())
    assert doc["rows"] == e2e.rows_from(doc["records"]) and doc["targets"] == e2e.verdicts(doc["records"])
    assert (tmp_path / "e2e_decode.md").read_text() == e2e.markdown(doc)
    assert "(random weights, float32 on cpu:" in e2e.markdown(doc)
    measured = e2e.measured_at(doc["records"])  # each group's own round count, beside its provenance
    assert [m.split(" at git")[0] for m in measured] == ["eager all7 batch 2", "static+graph all7 batch 2"]
    assert measured[0].endswith("(2 rounds)") and measured[1].endswith("(2 rounds, kept graph)")
    assert " on " not in " ".join(measured)  # one device: the header names it
    other = [{**r, "provenance": {**r["provenance"], "device": "cuda:X"}} if r["engine"] == "eager" else r
             for r in doc["records"]]  # a merged table whose groups ran on two devices names each group's
    assert e2e.measured_at(other)[0].split(" (")[0].endswith(" on cuda:X")
    assert " on cuda:X" not in e2e.measured_at(other)[1] and " on cpu" in e2e.measured_at(other)[1]
    assert doc["provenance"]["git_sha"] not in ("", "unknown")
    # the graph engine's calls taken apart by phase (bench.e2e.split_calls, default 3): every strategy, its replayed
    # steps, a table of them; the eager engine has none
    graph = next(r for r in doc["records"] if r["engine"] == "static+graph")
    assert set(graph["phases"]) == set(graph["rounds"])
    assert all(ph["replayed_steps"] == 2 and ph["replay"] > 0 for ph in graph["phases"].values())
    assert "phases" not in next(r for r in doc["records"] if r["engine"] == "eager")
    # the graph engine's warm start is the record's and the page's (the eager engine has none)
    assert graph["warm_start"] is True and graph["keep_graph"] is True
    assert "warm_start" not in next(r for r in doc["records"] if r["engine"] == "eager")
    assert "static+graph all7 batch 2 at git" in e2e.markdown(doc) and "rounds, kept graph)" in e2e.markdown(doc)
    split = e2e.phases_table(doc["records"])
    assert len(split) == 2 + len(graph["phases"]) and "## Where a graph-engine call's decode time goes" in e2e.markdown(doc)
    assert any(line.startswith("| static+graph | all7 | 2 | base |") and line.endswith("| 1.0 |") for line in split)
    # one graph-engine call of each named strategy profiled into the run dir, its phases as ranges (on the CPU no
    # capture: the prefill and the eager steps)
    profiles = sorted(p.name for p in (tmp_path / "run").glob("profile_e2e_*.txt"))
    assert profiles == ["profile_e2e_base_b2.txt", "profile_e2e_dlp-nucleus2_grouped_b2.txt"]
    text = (tmp_path / "run" / "profile_e2e_dlp-nucleus2_grouped_b2.txt").read_text()
    phase_rows = [line.split("|")[1].strip() for line in text.split("## by self")[0].splitlines()
                  if line.startswith("| ") and not line.startswith("| phase") and not line.startswith("| ---")]
    assert phase_rows == ["prefill", "replay"] and "## by self device time" in text and "aten::" in text


def _base_and_peft(tmp_path):
    """(contestants base and peft on the 2-layer CPU stand-in, its config, the CPU device)."""
    import torch

    from pipeline.stages.bench import SHAPES, shape_model

    config = SHAPES["llama3_8b_tiny"][0]
    adapter = {"_target_": "peft.LoraConfig", "_convert_": "all", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"],
               "task_type": "CAUSAL_LM"}
    cpu = torch.device("cpu")
    cont = e2e.Contestants(lambda: shape_model(config, cpu, torch.float32), adapter, "qv", 2, ["base", "peft"],
                           tmp_path, {})
    return cont, config, cpu


def test_a_spent_time_budget_leaves_strategies_out_by_name(tmp_path):
    """Under ``bench.max_seconds`` no warm-up starts after the deadline: the record keeps what was measured and
    names the rest (``skipped``), and the page says they were not measured."""
    import time

    cont, config, cpu = _base_and_peft(tmp_path)
    rec = e2e.measure(cont, "eager", 1, 4, 2, config["vocab_size"], cpu, 0, 1, "eager",
                      deadline=time.perf_counter() - 1)
    assert rec["rounds"] == {} and rec["skipped"] == ["base", "peft"]
    rec = e2e.measure(cont, "eager", 1, 4, 2, config["vocab_size"], cpu, 0, 1, "eager", deadline=None)
    assert set(rec["rounds"]) == {"base", "peft"} and "skipped" not in rec and set(rec["warmup_s"]) == {"base", "peft"}


def test_rounds_rotate_which_strategy_runs_first(tmp_path):
    """Interleaved rounds start each at the next strategy, so none is always first or last in a round."""
    cont, config, cpu = _base_and_peft(tmp_path)
    calls = []
    for name, gen in list(cont.generate.items()):
        cont.generate[name] = lambda *a, _g=gen, _n=name, **k: calls.append(_n) or _g(*a, **k)
    e2e.measure(cont, "eager", 1, 4, 2, config["vocab_size"], cpu, 0, 3, "eager")
    timed = calls[2 * 2:]  # after each strategy's warm-up (1 and 2 tokens; the peak-memory run is CUDA's only)
    firsts = [timed[i * 4] for i in range(3)]  # a round: each strategy times 1 token, then new_tokens
    assert firsts == ["base", "peft", "base"], calls


def test_a_strategy_that_fails_is_named_and_the_others_measured(tmp_path):
    """A warm-up that raises (e.g. a decode step a CUDA graph cannot capture) leaves that strategy out of the record,
    named in ``failed`` with the error's first line, on the page too; the others are timed as usual."""
    cont, config, cpu = _base_and_peft(tmp_path)

    def broken(*args, **kwargs):
        raise RuntimeError("operation not permitted when stream is capturing\nmore")

    cont.generate["peft"] = broken
    rec = e2e.measure(cont, "eager", 1, 4, 2, config["vocab_size"], cpu, 0, 1, "eager")
    assert set(rec["rounds"]) == {"base"} and rec["failed"] == {"peft": "operation not permitted when stream is capturing"}
    doc = {"provenance": {"git_sha": "x", "device": "cpu", "versions": {}, "date": "d"}, "config": {
        "shape": "t", "num_adapters": 2, "prompt_len": 4, "new_tokens": 2, "warmup": 0, "repeats": 1},
        "rows": e2e.rows_from([{**rec, "targets": "qv", "num_adapters": 2}]), "records": [{**rec, "targets": "qv"}],
        "targets": []}
    assert "| peft | | failed: operation not permitted" in e2e.markdown(doc)


COMMITTED = ROOT / "outputs" / "tables" / "e2e_decode.json"
COMMITTED_CPU = ROOT / "outputs" / "tables" / "cpu" / "e2e_decode.json"  # the same bench on this CPU (SmolLM2 shape)


@pytest.mark.parametrize("path, device", [(COMMITTED, "cuda:"), (COMMITTED_CPU, "cpu")], ids=["cuda_table", "cpu_table"])
def test_committed_table_is_rebuilt_from_its_records(path, device):
    if not path.is_file():
        pytest.skip(f"no committed {path.relative_to(ROOT)}")
    doc = json.loads(path.read_text())
    assert doc["provenance"]["git_sha"] not in ("", "unknown") and doc["provenance"]["device"].startswith(device)
    assert doc["rows"] == e2e.rows_from(doc["records"]) and doc["targets"] == e2e.verdicts(doc["records"])
    assert path.with_suffix(".md").read_text() == e2e.markdown(doc)


def test_claim_5_follows_the_paired_rounds_of_the_static_records():
    from pipeline.report.paper_claims import table_claims

    def rec(rounds, engine="static+compile"):
        return {"engine": engine, "targets": "all7", "batch_size": 1, "prompt_len": 8, "new_tokens": 9,
                "rounds": rounds, "peak_gb": {}}

    base, peft = [(0.0, 1.0)] * 3, [(0.0, 1.0), (0.0, 1.0), (0.0, 1.0)]
    dlp = [(0.0, 1.1), (0.0, 1.15), (0.0, 1.19)]  # 1.1..1.19x peft: every round within 1.2
    met = [(0.0, 1.2), (0.0, 1.35), (0.0, 1.4)]  # 1.2..1.4x base: rounds on both sides of 1.3
    doc = {"config": {"shape": "llama3_8b"}, "records": [
        rec({"base": base, "peft": peft, "dlp-nucleus2": dlp, "meteora-top2": met}),
        rec({"base": base, "peft": peft}, engine="eager")]}  # eager records are not claim 5's
    got = table_claims("e2e_decode", doc)
    assert [c["claim"][:3] for c in got] == ["5a.", "5b."]
    assert got[0]["verdict"] == "yes" and got[0]["measured"]["median_ratio"] == 1.15 and got[0]["holds"]
    assert got[1]["verdict"] == "inconclusive" and got[1]["measured"]["median_ratio"] == 1.35
    assert got[1]["holds"] is False
    # 3 rounds: the interval decided by is min..max, which holds the median 75% of the time, and says so
    assert (got[1]["interval"]["low"], got[1]["interval"]["high"], got[1]["interval"]["level"]) == (1.2, 1.4, 0.75)
    assert "75.0% interval of the median of 3 paired rounds" in got[1]["reason"]
    doc["records"][0]["rounds"] = {"base": base, "peft": peft}
    assert [c["verdict"] for c in table_claims("e2e_decode", doc)] == [None, None]
    doc["records"][0]["rounds"]["meteora-top2"] = [(0.0, 1.5)] * 3  # every round above 1.3
    assert table_claims("e2e_decode", doc)[1]["verdict"] == "no"


def test_claim_5_reads_the_graph_engine_and_the_grouped_rows():
    from pipeline.report.paper_claims import table_claims

    ones = [(0.0, 1.0)] * 3
    rounds = {"base": ones, "peft": ones, "dlp-nucleus2": [(0.0, 1.5)] * 3,
              "dlp-nucleus2+grouped": [(0.0, 1.1)] * 3, "meteora-top2": [(0.0, 2.0)] * 3}
    doc = {"config": {"shape": "llama3_8b"}, "records": [
        {"engine": "static+graph", "targets": "all7", "batch_size": 8, "prompt_len": 8, "new_tokens": 9,
         "rounds": rounds, "peak_gb": {}}]}
    got = {c["claim"].split(" at most")[0]: c for c in table_claims("e2e_decode", doc)}
    assert set(got) == {"5a. decode with dlp-nucleus2", "5a. decode with dlp-nucleus2+grouped",
                        "5b. decode with meteora-top2"}  # no grouped MeteoRA row was timed: no claim row for it
    assert got["5a. decode with dlp-nucleus2"]["verdict"] == "no"
    assert got["5a. decode with dlp-nucleus2+grouped"]["verdict"] == "yes"
    assert "batch 8, static cache + CUDA graph" in got["5b. decode with meteora-top2"]["claim"]
    del rounds["meteora-top2"], rounds["dlp-nucleus2"]  # a run that timed only the grouped forms
    rounds["meteora-top2+grouped"] = [(0.0, 1.2)] * 3
    got = {c["claim"].split(" at most")[0]: c for c in table_claims("e2e_decode", doc)}
    assert set(got) == {"5a. decode with dlp-nucleus2+grouped", "5b. decode with meteora-top2+grouped"}
    assert got["5b. decode with meteora-top2+grouped"]["verdict"] == "yes"


def test_q_v_bank_decodes_grouped(tmp_path):
    """targets=qv (DLP-LoRA's q / v bank): "+grouped" groups q / k / v with k as a plain member; DLP and MeteoRA (q's
    and v's gates packed, none for k) decode through the group (``tests/test_projection_groups.py`` checks their
    tokens); no record names members run alone any more (the tables up to 1df9a9e did, for MeteoRA)."""
    cmd = [sys.executable, "-m", "pipeline.bench", "experiment=e2e_decode", "print_config=false",
           "bench.shapes=[llama3_8b_tiny]", f"bench.table_dir={tmp_path}", "bench.e2e.targets=[qv]",
           "bench.e2e.engines=[eager]",
           "bench.e2e.strategies=[base,dlp-nucleus2+grouped,meteora-top2+grouped]",
           "bench.e2e.batch_sizes=[2]", "bench.e2e.num_adapters=3", "bench.e2e.new_tokens=3",
           "bench.e2e.prompt_len=6", "bench.e2e.repeats=1", f"hydra.run.dir={tmp_path / 'run'}"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    [rec] = json.loads((tmp_path / "e2e_decode.json").read_text())["records"]
    assert rec["targets"] == "qv" and "members_alone" not in rec
    assert set(rec["rounds"]) == {"base", "dlp-nucleus2+grouped", "meteora-top2+grouped"}
    assert "ran the members alone" not in (tmp_path / "e2e_decode.md").read_text()
