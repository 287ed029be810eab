"""Pipeline stages on the tiny random LLaMA and real BIG-bench rows (the `smoke` experiment), CPU, seconds each.

One module-scoped reproduce of `smoke` runs every stage in-process (the task adapters in one joint finetune run +
lora_b, meteora + dlp routers, five single-task strategies, composite-2, bench, report); the tests then read what
it wrote. A wandb offline run is decoded with wandb's own protobuf records. (The finetune multirun over two
tasks, in a subprocess: test_sweeps.py, which relaunches that same sweep.)
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import needs_assets
import pytest
import torch
from hydra.core.global_hydra import GlobalHydra
from needs_assets import needs_task_files, needs_tiny_model
from omegaconf import open_dict

from data.assets import cache_dir
from pipeline.runtime.compose import compose

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "conf"
pytestmark = needs_tiny_model


def compose_stage(stage: str, overrides: list[str], run_dir=None):
    GlobalHydra.instance().clear()
    cfg = compose(stage, overrides)
    with open_dict(cfg):
        cfg.paths.run_dir = str(run_dir) if run_dir else str(Path(str(cfg.paths.exp_dir)) / "test-run" / stage)
        cfg.print_config = False
    return cfg


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """Run `reproduce experiment=smoke` once into a temp output root; return (overrides, experiment dir)."""
    from pipeline.stages.reproduce import reproduce

    root = tmp_path_factory.mktemp("outputs")
    overrides = ["experiment=smoke", f"paths.output_root={root}", "logger=none", "allow_dirty=true"]
    cfg = compose_stage("reproduce", overrides)
    report = reproduce(cfg, overrides=overrides)
    return overrides, report.parent


def _metrics(exp: Path, stage: str, step: str) -> dict:
    return json.loads((exp / stage / step / "metrics.json").read_text())


@needs_task_files
def test_every_stage_wrote_metrics_json(smoke):
    _, exp = smoke
    schema = {"stage", "experiment", "tasks", "strategy", "metrics", "provenance"}
    found = {}
    for path in exp.rglob("metrics.json"):
        rec = json.loads(path.read_text())
        assert schema <= rec.keys(), path
        assert {"git_sha", "device", "versions", "date", "seed"} <= rec["provenance"].keys()
        assert rec["experiment"] == "smoke"
        found.setdefault(rec["stage"], []).append(rec)
    assert {"finetune", "route", "evaluate", "bench", "report"} <= found.keys()
    assert len(found["finetune"]) == 2 and len(found["route"]) == 2  # the task adapters' joint run, and lora_b


@needs_task_files
def test_finetune_writes_a_standard_peft_adapter(smoke):
    from peft import PeftConfig

    _, exp = smoke
    rec = _metrics(exp, "finetune", "all")  # reproduce's default on one process: the task adapters trained jointly
    assert rec["metrics"]["steps"] == 4 and rec["metrics"]["winowhy/val_loss"] > 0 and rec["metrics"]["adapters"] == 2
    for name in ("winowhy", "object_counting", "lora_b"):
        conf = PeftConfig.from_pretrained(str(exp / "adapters" / name))
        assert conf.r == 8 and conf.lora_alpha == 16
        assert set(conf.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                            "down_proj"}
    meta = json.loads((exp / "adapters" / "lora_b" / "loramux.json").read_text())
    assert meta["tasks"] == ["object_counting", "winowhy"]
    assert _metrics(exp, "finetune", "lora_b")["metrics"]["train_rows"] == 16  # 2 tasks x cap 8
    assert not list((exp / "adapters").glob(".*tmp"))  # no temp dirs left behind


def test_answer_only_labels():
    from transformers import AutoTokenizer

    from data.batches import AnswerOnlyCollator, encode_pair

    tok = AutoTokenizer.from_pretrained(str(cache_dir() / "models" / "tiny-random-llama"))
    enc = encode_pair(tok, "[INST] Q: 2+2? [/INST]\n", "four", max_length=64)
    n_answer = len(tok("four", add_special_tokens=False)["input_ids"]) + 1  # + EOS
    assert enc["labels"][:-n_answer] == [-100] * (len(enc["input_ids"]) - n_answer)
    assert enc["labels"][-n_answer:] == enc["input_ids"][-n_answer:]
    assert enc["input_ids"][-1] == tok.eos_token_id
    short = encode_pair(tok, "x " * 100, "four", max_length=16)
    assert len(short["input_ids"]) == 16 and short["labels"][-n_answer:] == short["input_ids"][-n_answer:]
    batch = AnswerOnlyCollator(tok.pad_token_id)([enc, short])
    assert batch["labels"].shape == batch["input_ids"].shape
    assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()


@needs_tiny_model
@needs_task_files
def test_batched_encoding_gives_every_row_the_ids_of_its_own_call():
    """Stages encode a task's rows in one batched tokenizer call; each row must get exactly what encoding it alone
    gives (long and short prompts, an empty answer, a prompt cut from the left)."""
    from transformers import AutoTokenizer

    from data.batches import encode_pair, encode_pairs, encode_prompts
    from data.task_rows import task_rows

    tok = AutoTokenizer.from_pretrained(str(cache_dir() / "models" / "tiny-random-llama"))
    rows = task_rows("paragraph_segmentation", "train", 6, 0) + task_rows("winowhy", "train", 6, 0)
    prompts, answers = [r["prompt"] for r in rows] + ["x " * 300], [r["answer"] for r in rows] + [""]
    assert encode_prompts(tok, prompts) == [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    assert encode_pairs(tok, prompts, answers, 48) == [encode_pair(tok, p, a, 48) for p, a in zip(prompts, answers)]
    assert max(len(e["input_ids"]) for e in encode_pairs(tok, prompts, answers, 48)) == 48  # cut from the left
    assert encode_prompts(tok, []) == [] and encode_pairs(tok, [], [], 8) == []


@needs_task_files
def test_routers_trained_and_saved(smoke):
    _, exp = smoke
    for router in ("meteora", "dlp"):
        rec = _metrics(exp, "route", router)
        assert 0.0 <= rec["metrics"]["router_accuracy"] <= 1.0
        assert (exp / "routers" / router / "router.safetensors").is_file()
    _assert_accuracy_by_projection_and_layer(_metrics(exp, "route", "meteora"))
    dlp = _metrics(exp, "route", "dlp")  # a sentence router: no gate per projection, nothing counted per layer
    assert dlp["router_accuracy_by_projection"] is None and dlp["router_accuracy_by_layer"] is None


@needs_task_files
def test_evaluate_scores_each_strategy_and_saves_predictions(smoke):
    _, exp = smoke
    for label in ("base", "oracle", "meteora-top2", "dlp", "lora_b"):
        rec = _metrics(exp, "evaluate", label)
        assert rec["strategy"] == label
        for task in ("object_counting", "winowhy"):
            assert 0.0 <= rec["metrics"][f"{task}/score"] <= 1.0
            assert rec["metrics"][f"{task}/n"] == 4
        lines = [json.loads(x) for x in (exp / "evaluate" / label / "predictions.jsonl").read_text().splitlines()]
        assert len(lines) == 8 and {"prompt", "answer", "prediction", "new_tokens", "eos"} <= lines[0].keys()
        for x in lines:  # how each row ended: by EOS within its task's budget, or at the budget
            budget = rec["metrics"][f"{x['task']}/max_new_tokens"]
            assert 0 <= x["new_tokens"] <= budget and (x["eos"] or x["new_tokens"] == budget)
        assert rec["metrics"]["no_text_at_budget"] == sum(
            1 for x in lines if x["prediction"] == "" and not x["eos"]
            and x["new_tokens"] == rec["metrics"][f"{x['task']}/max_new_tokens"])
    comp = _metrics(exp, "evaluate", "composite2-dlp")
    assert comp["composite_n"] == 2 and 0.0 <= comp["metrics"]["attempts"] <= 2.0
    assert comp["router_config"]["top_p"] == 0.6  # the knobs the router ran with, recorded beside its name
    pred = json.loads((exp / "evaluate" / "composite2-dlp" / "predictions.jsonl").read_text().splitlines()[0])
    assert pred["route"] is not None and abs(sum(pred["route"]["weights"]) - 1.0) < 1e-3  # dlp's nucleus


@needs_task_files
def test_bench_rows_have_ratios(smoke):
    _, exp = smoke
    rec = _metrics(exp, "bench", "bench")
    rows = rec["rows"]
    assert {r["strategy"] for r in rows} == {"base", "oracle", "dlp"}
    assert {r["num_adapters"] for r in rows if r["strategy"] == "dlp"} == {1, 2}
    assert all(r["decode_ms_per_token"] >= 0 and r["prefill_tok_s"] > 0 for r in rows)
    # eager: base timed beside each bank size (its rounds interleaved with the routers'), each ratio to its own base
    base = [r for r in rows if r["strategy"] == "base"]
    assert [r["ratio_to_base"] for r in base] == [1.0, 1.0] and [r["alongside"] for r in base] == [1, 2]
    for r in rows:
        ref = next(b for b in base if b["alongside"] == r["alongside"])
        assert r["ratio_to_base"] == pytest.approx(r["decode_ms_per_token"] / ref["decode_ms_per_token"], abs=2e-3)
        assert len(r["rounds"]) == rec["bench"]["repeats"]


@needs_task_files
def test_report_tables_and_plots(smoke):
    _, exp = smoke
    md = (exp / "report.md").read_text()
    for title in ("Adapters (finetune)", "Per-task score by routing strategy", "Composite-2", "End-to-end latency"):
        assert title in md
    assert ("Task files: stand-in" in md) == (needs_assets.STANDIN is not None)  # a stand-in run's report says so
    header = (exp / "tables" / "tasks.csv").read_text().splitlines()[0].split(",")
    assert header[0] == "task" and {"base", "oracle", "meteora-top2", "dlp", "lora_b"} <= set(header)
    evaluate = _metrics(exp, "evaluate", "oracle")
    row = next(r for r in (exp / "tables" / "tasks.csv").read_text().splitlines() if r.startswith("winowhy,"))
    assert float(row.split(",")[header.index("oracle")]) == pytest.approx(evaluate["metrics"]["winowhy/score"],
                                                                         abs=1e-4)
    for png in ("tasks_radar.png", "composite_2.png", "latency.png"):
        assert (exp / "plots" / png).read_bytes()[:4] == b"\x89PNG"


@needs_task_files
def test_reproduce_skips_finished_steps(smoke, capsys):
    from pipeline.stages.reproduce import reproduce

    overrides, exp = smoke
    before = (exp / "finetune" / "all" / "metrics.json").stat().st_mtime_ns
    reproduce(compose_stage("reproduce", overrides), overrides=overrides)
    out = capsys.readouterr().out
    assert out.count("skipped") == 12 and "running" not in out
    assert (exp / "finetune" / "all" / "metrics.json").stat().st_mtime_ns == before


def test_unknown_task_is_one_clear_error(tmp_path):
    from pipeline.stages.finetune import finetune

    cfg = compose_stage("finetune", ["experiment=smoke", "task=winowhyy", f"paths.output_root={tmp_path}",
                                     "logger=none"], tmp_path / "run")
    with pytest.raises(ValueError, match=r"unknown task 'winowhyy'; did you mean winowhy"):
        finetune(cfg)


def test_missing_adapter_names_the_fix(tmp_path):
    from pipeline.stages.evaluate import evaluate

    cfg = compose_stage("evaluate", ["experiment=smoke", f"paths.output_root={tmp_path}", "logger=none"],
                        tmp_path / "run")
    with pytest.raises(FileNotFoundError, match=r"python -m pipeline.finetune experiment=smoke task=object_counting"):
        evaluate(cfg)


def _env(tmp_path):
    return {**os.environ, "LORAMUX_OUTPUTS": str(tmp_path), "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1"}


def test_user_error_exits_with_one_line(tmp_path):
    cmd = [sys.executable, "-m", "pipeline.finetune", "experiment=smoke", "task=nosuch_task", "logger=none",
           "print_config=false"]
    proc = subprocess.run(cmd, check=False, cwd=ROOT, env=_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: unknown task 'nosuch_task'; (list: python -m data.tasks)"] or \
        (len(errors) == 1 and "nosuch_task" in errors[0])
    assert "Traceback" not in proc.stderr


# ------------------------------------------------------------------------------------------ wandb offline
def read_wandb_records(path: Path):
    """Decode an offline ``.wandb`` file: LevelDB-style log blocks of wandb protobuf ``Record`` messages."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", "not a wandb transaction log"
    block, pos, pending, out = 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block trailer too short for a header: skip to the next block
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if pos + 7 + length > len(data):  # the writer is still flushing this record: read what is whole
            break
        payload, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0:
            continue
        if kind == 1:  # FULL
            chunks = payload
        elif kind == 2:  # FIRST
            pending = payload
            continue
        elif kind == 3:  # MIDDLE
            pending += payload
            continue
        else:  # LAST
            chunks, pending = pending + payload, b""
        rec = pb.Record()
        rec.ParseFromString(chunks)
        out.append(rec)
    return out


@needs_task_files
def test_wandb_offline_run_holds_the_report_table(smoke, monkeypatch):
    from pipeline.stages.report import report

    overrides, exp = smoke
    monkeypatch.setenv("WANDB_MODE", "offline")
    run_dir = exp / "report" / "wandb-check"
    kept = [o for o in overrides if not o.startswith(("logger=", "allow_dirty="))]
    cfg = compose_stage("report", [*kept, "logger=wandb"], run_dir)
    assert report(cfg) >= 4
    [log_file] = list(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
    from google.protobuf.message import DecodeError

    for _ in range(60):  # wandb's service may still be flushing the log when finish() returns: wait for `exit`
        try:
            records = read_wandb_records(log_file)
        except DecodeError:  # caught mid-write (a record's bytes not all there yet): read again
            records = []
        if any(r.WhichOneof("record_type") == "exit" for r in records):
            break
        time.sleep(0.5)
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert run.run_group == "smoke" and run.job_type == "report"
    items: dict = {}  # history items, re-nested: wandb flattens a logged dict (a Table's metadata) into paths
    for r in records:
        if r.WhichOneof("record_type") == "history":
            for i in r.history.item:
                path = [i.key] if i.key else list(i.nested_key)
                node = items
                for part in path[:-1]:
                    node = node.setdefault(part, {})
                node[path[-1]] = json.loads(i.value_json)
    table = items["report/tasks"]
    assert table["_type"] == "table-file"
    logged = json.loads((log_file.parent / "files" / table["path"]).read_text())
    csv_header = (exp / "tables" / "tasks.csv").read_text().splitlines()[0].split(",")
    assert logged["columns"] == csv_header
    assert [row[0] for row in logged["data"]] == ["object_counting", "winowhy", "mean"]
    assert items["report/tasks_plot"]["_type"] == "image-file"


# ------------------------------------------------------------------------------------------ raw records
def _plain(rec: dict) -> dict:
    return {k: v for k, v in rec.items() if not k.startswith("_")}


@needs_task_files
def test_records_round_trip_and_rebuild_the_tables(smoke, tmp_path):
    """The smoke runs' metrics.json, predictions and configs, written compressed and read back, give the same paper
    tables (rows, claims with their intervals, each run's provenance) as the run dirs."""
    from pipeline.report.paper_tables import build_paper_table
    from pipeline.report.records import config_of, predictions_of, prompt_sha1, read_records, write_records
    from pipeline.stages.report import collect_records

    _, exp = smoke
    runs = collect_records(exp)
    out = write_records(runs, exp, tmp_path / "records" / "smoke")
    index = json.loads((out / "index.json").read_text())["experiment_runs"]
    assert {e["run"] for e in index} == {r["_run"] for r in runs} and "evaluate/oracle" in {e["run"] for e in index}
    again = read_records(out)
    by = {r["_run"]: r for r in runs}
    assert by.keys() == {r["_run"] for r in again}
    for rec in again:
        src = by[rec["_run"]]
        assert _plain(rec) == _plain(src)
        lines, plain = predictions_of(rec), predictions_of(src)
        assert len(lines) == len(plain) and all("prompt" not in x for x in lines)
        assert [x["prompt_sha1"] for x in lines] == [prompt_sha1(x["prompt"]) for x in plain]
        assert [x["prediction"] for x in lines] == [x["prediction"] for x in plain]
        assert config_of(rec) == config_of(src) and config_of(rec)["stage"] == rec["stage"]
    first = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    write_records(runs, exp, out)  # the same runs give the same bytes: a re-run report changes nothing in git
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == first
    for name in ("meteora_tasks", "dlp_tasks", "head_to_head"):
        from_runs, from_records = build_paper_table(name, runs), build_paper_table(name, again)
        assert from_records["rows"] == from_runs["rows"] and from_records["claims"] == from_runs["claims"], name
        assert from_records["provenance"]["by_run"] == from_runs["provenance"]["by_run"], name
    [claim] = build_paper_table("meteora_tasks", again)["claims"]
    assert claim["interval"]["rows"] == 8  # oracle vs meteora-top2, paired over the 2 x 4 test rows


@pytest.mark.slow  # real training subprocesses: tens of seconds
@needs_task_files
def test_report_rebuilds_a_paper_table_from_records_offline(smoke, tmp_path):
    """`python -m pipeline.report ... records=<dir>`: the table from the committed records alone; a dir that is
    not a records dir is one error line and exit 2."""
    from pipeline.report.paper_tables import build_paper_table
    from pipeline.report.records import write_records
    from pipeline.stages.report import collect_records

    _, exp = smoke
    runs = collect_records(exp)
    records = write_records(runs, exp, tmp_path / "records" / "smoke")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "pipeline.report", "experiment=smoke", "paper_table=meteora_tasks",
           f"records={records}", f"paper_tables_dir={out / 'tables'}", f"paths.output_root={out}", "logger=none",
           f"hydra.run.dir={tmp_path / 'run'}"]
    proc = subprocess.run(cmd, check=False, cwd=ROOT, env=_env(tmp_path), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    table = json.loads((out / "tables" / "meteora_tasks.json").read_text())
    want = json.loads(json.dumps(build_paper_table("meteora_tasks", runs)))
    assert table["rows"] == want["rows"] and table["claims"] == want["claims"]
    assert not (out / "records").exists()  # reading committed records never rewrites them
    bad = subprocess.run([*cmd[:5], f"records={tmp_path / 'run'}", *cmd[6:]], check=False, cwd=ROOT,
                         env=_env(tmp_path), capture_output=True, text=True, timeout=300)
    errors = [line for line in bad.stderr.splitlines() if line.startswith("error:")]
    assert bad.returncode == 2 and len(errors) == 1 and "index.json" in errors[0], bad.stderr[-2000:]


@pytest.mark.slow  # real training subprocesses: tens of seconds
def test_reproduce_refuses_unknown_or_dirty_code_unless_allowed(tmp_path):
    report_only = [sys.executable, "-m", "pipeline.reproduce", "experiment=smoke", "plan.finetune=[]", "~plan.route",
                   "+plan.route={}", "~plan.evaluate", "+plan.evaluate={}", "plan.composite=[]", "plan.bench=false",
                   "logger=none", "print_config=false"]
    for sha in ("unknown", "0123abc+dirty"):
        proc = subprocess.run(report_only, check=False, cwd=ROOT, env={**_env(tmp_path), "LORAMUX_GIT_SHA": sha},
                              capture_output=True, text=True, timeout=300)
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert proc.returncode == 2 and len(errors) == 1 and "allow_dirty=true" in errors[0], proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr
    proc = subprocess.run([*report_only, "allow_dirty=true"], check=False, cwd=ROOT,
                          env={**_env(tmp_path), "LORAMUX_GIT_SHA": "0123abc+dirty"}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    prov = json.loads((tmp_path / "smoke" / "report" / "report" / "metrics.json").read_text())["provenance"]
    assert prov["git_sha"] == "0123abc+dirty" and prov["allow_dirty"] is True


@needs_task_files
def test_evaluate_gives_each_task_its_answer_budget(smoke, tmp_path):
    """generation.max_new_tokens=auto: each task generates up to its own budget from its gold answers (recorded);
    composite-n sums its sub-tasks' budgets."""
    from pipeline.stages.answer_budget import NUMBERING_TOKENS, answer_budget
    from pipeline.stages.evaluate import evaluate

    overrides, _exp = smoke
    common = [o for o in overrides if not o.startswith("allow_dirty=")] + [
        "router=base", "data.test_limit=2", "generation.max_new_tokens=auto",
        "generation.composite_max_new_tokens_per_task=auto", "composite_rows=2"]
    cfg = compose_stage("evaluate", common, tmp_path / "single")
    evaluate(cfg)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(cache_dir() / "models" / "tiny-random-llama")
    metrics = json.loads((tmp_path / "single" / "metrics.json").read_text())["metrics"]
    for task in ("object_counting", "winowhy"):
        assert metrics[f"{task}/max_new_tokens"] == answer_budget(task, tok)
    evaluate(compose_stage("evaluate", [*common, "composite_n=2"], tmp_path / "composite"))
    metrics = json.loads((tmp_path / "composite" / "metrics.json").read_text())["metrics"]
    assert metrics["max_new_tokens"] == sum(answer_budget(t, tok) + NUMBERING_TOKENS
                                            for t in ("object_counting", "winowhy"))


@needs_task_files
def test_evaluate_graph_engine_predicts_what_generate_does(smoke, tmp_path):
    """generation.engine=graph (models.graph_generate; uncaptured on the CPU) writes the same predictions as
    transformers' generate, single tasks (oracle) and composite-2 (EOS held back by a logits processor), and so
    does it with generation.group_projections; the run records which engine ran and how many groups."""
    from pipeline.stages.evaluate import evaluate

    overrides, _exp = smoke
    common = [o for o in overrides if not o.startswith("allow_dirty=")] + ["data.test_limit=3", "composite_rows=2"]
    for extra in (["router=oracle"], ["router=base", "composite_n=2"]):
        preds = {}
        for engine, grouped in (("generate", False), ("graph", False), ("graph", True)):
            out = tmp_path / f"{extra[-1]}-{engine}-{grouped}"
            evaluate(compose_stage("evaluate", [*common, *extra, f"generation.engine={engine}",
                                                f"generation.group_projections={str(grouped).lower()}"], out))
            preds[engine, grouped] = [json.loads(x)["prediction"]
                                      for x in (out / "predictions.jsonl").read_text().splitlines()]
            rec = json.loads((out / "metrics.json").read_text())["metrics"]
            assert rec["generation_engine"] == engine and (rec["projection_groups"] > 0) == grouped
            assert rec["decodes_grouped"] == grouped  # oracle and base share their route: the groups decode
        assert preds["graph", False] == preds["generate", False] == preds["graph", True]
        assert len(preds["graph", False]) >= 2


@needs_task_files
def test_route_trains_until_the_target_accuracy(smoke, tmp_path):
    """router.train.target_accuracy: the fit stops at the first validation at or above it (steps is the bound);
    the route record keeps the curve and the step; an unreachable target runs every step and says so."""
    from pipeline.stages.route import route

    overrides, _ = smoke
    base = [o for o in overrides if not o.startswith("allow_dirty=")] + [
        "router=meteora", "router.train.steps=6", "router.train.val_check_interval=2",
        f"paths.routers_dir={tmp_path / 'routers'}"]
    route(compose_stage("route", [*base, "router.train.target_accuracy=0.0001"], tmp_path / "easy"))
    easy = json.loads((tmp_path / "easy" / "metrics.json").read_text())
    assert easy["metrics"]["steps"] == 2 and easy["target_reached_step"] == 2 and easy["target_accuracy"] == 0.0001
    assert [s for s, _ in easy["router_accuracy_curve"]] == [2]
    route(compose_stage("route", [*base, "router.train.target_accuracy=1.0"], tmp_path / "hard"))
    hard = json.loads((tmp_path / "hard" / "metrics.json").read_text())
    assert hard["metrics"]["steps"] == 6 and hard["target_reached_step"] is None
    assert [s for s, _ in hard["router_accuracy_curve"]] == [2, 4, 6]
    assert hard["router_accuracy_curve"][-1][1] == pytest.approx(hard["metrics"]["router_accuracy"], abs=1e-6)
    # no causal gate beats the ceiling of its validation rows (every gate routes from tokens up to its own)
    assert 0 < hard["metrics"]["router_accuracy"] <= hard["router_accuracy_ceiling"] <= 1
    assert set(hard["router_accuracy_ceiling_by_task"]) == set(hard["adapters"])
    # beside it, what a router reading one token scores on the same rows (a layer-0 q / k / v gate's view)
    assert 0 <= hard["router_accuracy_one_token"] <= 1
    assert set(hard["router_accuracy_one_token_by_task"]) == set(hard["adapters"])
    # where the accuracy is lost: each of the 7 x layers gates' accuracy over the last validation, and each layer's
    _assert_accuracy_by_projection_and_layer(hard)
    # and on the answer tokens apart from the prompt's: a curve beside the monitored one, its last point the record's
    answers = hard["router_accuracy_answers_curve"]
    assert [s for s, _ in answers] == [2, 4, 6] and answers[-1][1] == pytest.approx(hard["router_accuracy_answers"],
                                                                                    abs=1e-6)
    assert 0 <= hard["router_accuracy_prompts"] <= 1 and set(hard["router_accuracy_answers_by_task"]) == set(
        hard["adapters"])


@needs_task_files
def test_route_with_train_loras_keeps_the_cotrained_adapters_and_evaluate_runs_on_them(smoke, tmp_path):
    """router.train.train_loras=true (MeteoRA's script: gates and LoRA weights trained together): the router dir
    holds the adapters it ended with, as PEFT dirs peft loads, different from the ones it started from, and its
    router.json names them; the plan of an evaluate (and bench) loads those, the bank then holds their weights.
    A router saved without them names none, and the experiment's adapters are used. The route run's record dir
    keeps the same files (hard links where the filesystem allows)."""
    from peft import PeftModel
    from safetensors.torch import load_file

    from pipeline.runtime.multilora import build_multilora, plan_multilora
    from pipeline.stages.route import route

    overrides, exp = smoke
    base = [o for o in overrides if not o.startswith("allow_dirty=")] + [
        "router=meteora", "router.train.steps=3", "router.train.val_check_interval=3", "router.train.lr=0.05",
        f"paths.routers_dir={tmp_path / 'routers'}"]
    route(compose_stage("route", [*base, "router.train.train_loras=true"], tmp_path / "co"))
    router_dir = tmp_path / "routers" / "meteora"
    assert json.loads((router_dir / "router.json").read_text())["adapters"] == "adapters"
    names = ["object_counting", "winowhy"]
    for name in names:
        mine, start = router_dir / "adapters" / name, exp / "adapters" / name
        assert (mine / "adapter_config.json").read_text() == (start / "adapter_config.json").read_text()
        new, old = load_file(str(mine / "adapter_model.safetensors")), load_file(str(start / "adapter_model.safetensors"))
        assert new.keys() == old.keys() and max(float((new[k] - old[k].float()).abs().max()) for k in new) > 0
        assert json.loads((mine / "loramux.json").read_text())["cotrained_from"] == str(start)
        run_copy = tmp_path / "co" / "router" / "adapters" / name  # the run's own copy: the same bytes (hard-linked)
        assert sorted(p.name for p in run_copy.iterdir()) == sorted(p.name for p in mine.iterdir())
        assert all((run_copy / f.name).read_bytes() == f.read_bytes() for f in mine.iterdir())
    from models.base import load_base_model

    model, _ = load_base_model(str(cache_dir() / "models" / "tiny-random-llama"))
    PeftModel.from_pretrained(model, str(router_dir / "adapters" / names[0]))  # a standard PEFT dir
    ev = compose_stage("evaluate", [*base, f"router.checkpoint={router_dir}"], tmp_path / "ev")
    plan = plan_multilora(ev)
    assert plan.adapters == {n: router_dir / "adapters" / n for n in names}
    mm, _ = build_multilora(ev, plan=plan)
    got = mm.bank.peft_state(mm.bank.index("winowhy"))
    want = load_file(str(router_dir / "adapters" / "winowhy" / "adapter_model.safetensors"))
    assert got.keys() == want.keys() and all(torch.equal(got[k].float(), want[k]) for k in want)
    # the adapters it started from are not read (nor need to exist) once the router has its own
    gone = compose_stage("evaluate", [*base, f"router.checkpoint={router_dir}",
                                      f"paths.adapters_dir={tmp_path / 'none'}"], tmp_path / "ev2")
    assert plan_multilora(gone).adapters == plan.adapters
    # router.train.lora_lr: the adapters' own lr (here so small that they stay as they started), the gates' at lr
    slow = tmp_path / "slow_routers"
    route(compose_stage("route", [*base, "router.train.train_loras=true", "router.train.lora_lr=1e-12",
                                  f"paths.routers_dir={slow}"], tmp_path / "slow"))
    for name in names:
        new = load_file(str(slow / "meteora" / "adapters" / name / "adapter_model.safetensors"))
        old = load_file(str(exp / "adapters" / name / "adapter_model.safetensors"))
        assert max(float((new[k] - old[k].float()).abs().max()) for k in new) < 1e-6
    from pipeline.stages.route import RouterTrainModule

    groups = RouterTrainModule(mm, lr=0.05, train_loras=True, lora_lr=1e-3).param_groups()
    bank = {id(p) for sl in mm.bank.slots.values() for p in (sl.A, sl.B)}
    assert [g["base_lr"] for g in groups] == [0.05, 1e-3]  # the gates at lr, the adapters at lora_lr
    assert {id(p) for p in groups[1]["params"]} == bank and not bank & {id(p) for p in groups[0]["params"]}
    # router.adapters_from: another strategy (the oracle) on a router's co-trained adapters, the oracle's own routing
    others = [o for o in base if not o.startswith("router")]
    orc = compose_stage("evaluate", [*others, "router=oracle", f"router.adapters_from={router_dir}"], tmp_path / "o")
    assert plan_multilora(orc).adapters == plan.adapters and plan_multilora(orc).checkpoint is None
    # router.adapters_from=experiment: the co-trained gates over the experiment's adapters as fine-tuned
    own = compose_stage("evaluate", [*base, f"router.checkpoint={router_dir}", "router.adapters_from=experiment"],
                        tmp_path / "own")
    assert plan_multilora(own).adapters == {n: exp / "adapters" / n for n in names}
    assert plan_multilora(own).checkpoint == router_dir and plan_multilora(own).load
    mm_own, _ = build_multilora(own)  # the gates loaded, the bank the experiment's adapters, not the co-trained
    start = load_file(str(exp / "adapters" / "winowhy" / "adapter_model.safetensors"))
    held = mm_own.bank.peft_state(mm_own.bank.index("winowhy"))
    assert all(torch.equal(held[k].float(), start[k].float()) for k in start) and mm_own.router.name == "meteora"
    assert any(not torch.equal(want[k], start[k].float()) for k in start)  # co-training did change them
    mm.save_router(router_dir)  # as route saves a router trained without train_loras: it names no adapters
    assert "adapters" not in json.loads((router_dir / "router.json").read_text())
    assert plan_multilora(ev).adapters == {n: exp / "adapters" / n for n in names}
    with pytest.raises(ValueError, match="left unchanged.*drop router.adapters_from"):
        plan_multilora(orc)  # that router has no co-trained adapters (any more)
    with pytest.raises(FileNotFoundError, match="no router there; train it first"):
        plan_multilora(compose_stage("evaluate", [*others, "router=oracle",
                                                  f"router.adapters_from={tmp_path / 'nowhere'}"], tmp_path / "o2"))


def _assert_accuracy_by_projection_and_layer(rec: dict) -> None:
    """A MeteoRA route record's ``router_accuracy_by_projection`` (a gate key per wrapped projection: 7 per layer of
    the tiny model) and ``router_accuracy_by_layer`` (every layer index), accuracies in [0, 1]; per-layer values
    are the means of that layer's gates; the record's keys from before are still there."""
    layers = json.loads((cache_dir() / "models" / "tiny-random-llama" / "config.json").read_text())["num_hidden_layers"]
    by_projection, by_layer = rec["router_accuracy_by_projection"], rec["router_accuracy_by_layer"]
    assert len(by_projection) == 7 * layers and all(k.startswith("model__layers__") for k in by_projection)
    assert list(by_layer) == [str(i) for i in range(layers)]  # every layer, in order (no "other": all are layers)
    assert all(0 <= v <= 1 for v in [*by_projection.values(), *by_layer.values()])
    for i in range(layers):
        mine = [v for k, v in by_projection.items() if k.startswith(f"model__layers__{i}__")]
        assert len(mine) == 7 and by_layer[str(i)] == pytest.approx(sum(mine) / 7, abs=1e-5)
    assert set(rec["router_accuracy_by_task"]) == set(rec["adapters"])


def test_confusion_record_by_hand():
    """pipeline.stages.route.confusion_record: the counts as rows, and each task's three largest off-diagonal shares
    of its pairs (>= 0.01, largest first); a task without pairs confuses nothing; a matrix of the wrong size is an
    error; no counts, no record."""
    from pipeline.stages.route import confusion_record

    counts = torch.tensor([[6, 3, 1, 0], [0, 10, 0, 0], [1, 2, 3, 4], [0, 0, 0, 0]])
    rec = confusion_record(counts, ["a", "b", "c", "d"])
    assert rec["tasks"] == ["a", "b", "c", "d"] and rec["counts"] == counts.tolist()
    assert rec["confused_with"] == {"a": [["b", 0.3], ["c", 0.1]], "b": [], "c": [["d", 0.4], ["b", 0.2], ["a", 0.1]],
                                    "d": []}
    with pytest.raises(ValueError, match="4-row confusion matrix for 3 adapters"):
        confusion_record(counts, ["a", "b", "c"])
    assert confusion_record(None, ["a"]) is None


def test_projection_accuracies_by_hand():
    """pipeline.stages.route.projection_accuracies on counts summed by hand: each gate's hits over the labelled
    tokens, each layer's mean (its index parsed from the gate key or module name; ``other`` without one)."""
    from pipeline.stages.route import layer_of, projection_accuracies

    keys = ["model__layers__0__self_attn__q_proj", "model__layers__0__mlp__down_proj",
            "model__layers__10__self_attn__q_proj", "model__layers__2__self_attn__q_proj", "lm_head"]
    got = projection_accuracies((torch.tensor([1, 3, 8, 7, 5]), torch.tensor(8)), keys)
    assert got["router_accuracy_by_projection"] == dict(zip(keys, [0.125, 0.375, 1.0, 0.875, 0.625], strict=True))
    assert got["router_accuracy_by_layer"] == {"0": 0.25, "2": 0.875, "10": 1.0, "other": 0.625}
    assert list(got["router_accuracy_by_layer"]) == ["0", "2", "10", "other"]
    assert projection_accuracies((torch.tensor([0, 0]), torch.tensor(0)), keys[:2])["router_accuracy_by_layer"] == {
        "0": None}  # no labelled token: no accuracy
    assert projection_accuracies(None, []) == {"router_accuracy_by_projection": None, "router_accuracy_by_layer": None}
    assert layer_of("model.layers.12.self_attn.q_proj") == "12" == layer_of("model__layers__12__mlp__up_proj")
    assert layer_of("transformer.h.3.attn.c_attn") == "3" and layer_of("lm_head") == "other"
