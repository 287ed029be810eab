"""The training-throughput benchmark (pipeline/stages/train_throughput.py): its stage on the CPU stand-in of SmolLM2's shape
writes a table whose ratios and verdicts follow from its rows, and the committed H200 table is rebuilt exactly
from its own rows (nothing in it typed by hand)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.stages import train_throughput as tt

ROOT = Path(__file__).resolve().parent.parent
COMMITTED = ROOT / "outputs" / "tables" / "train_throughput.json"


def _row(variant, batch, rounds, compiled=False):
    ms = sorted(rounds)[len(rounds) // 2]
    return {"variant": variant, "precision": "bf16", "compiled": compiled, "batch_size": batch, "seq_len": 256,
            "num_adapters": 28, "tokens_per_s": batch * 256 / (ms / 1000), "ms_per_step": ms,
            "ms_per_step_rounds": rounds, "peak_gb": None, "graph_breaks": None}


def test_verdicts_follow_the_paired_rounds():
    rows = [_row("peft_single", 16, [100.0, 100.0, 100.0]), _row("loramux_single", 16, [99.0, 98.0, 97.0]),
            _row("peft_single", 64, [100.0, 100.0, 100.0]), _row("loramux_single", 64, [99.0, 101.0, 110.0]),
            _row("loramux_joint", 64, [120.0, 130.0, 125.0]), _row("loramux_gates", 64, [150.0, 150.0, 150.0]),
            _row("loramux_gates", 256, [500.0, 450.0, 480.0])]
    tt.add_ratios(rows)
    got = {(t["variant"], t["batch_size"], "ratio" in t): t["verdict"] for t in tt.verdicts(rows)}
    assert got[("loramux_single", 16, True)] == "yes"  # every round faster than peft's
    assert got[("loramux_single", 64, True)] == "inconclusive"  # rounds on both sides of 1.0
    assert got[("loramux_joint", 64, True)] == "no"  # 0.77..0.83 < 0.9 in every round
    assert got[("loramux_gates", 64, True)] == "no"  # 0.667 in every round
    assert got[("loramux_gates", 256, False)] == "no"  # its best batch: 131k..146k tokens/s, all under 150k
    r = tt.paired_ratio(rows[3], rows[2])  # 3 rounds: the interval is min..max, which holds the median 75% of times
    assert (r["median"], r["low"], r["high"], r["n"]) == (round(100 / 101, 3), round(100 / 110, 3), round(100 / 99, 3), 3)
    assert r["coverage"] == 0.75


def test_one_batch_size_shows_the_rate_target_met_but_never_missed():
    """One batch size measured is no search for the best batch: a rate over the target there is a lower bound of the
    best batch's (yes), a rate under it says nothing of the other batches (None)."""
    fast = [_row("loramux_gates", 256, [300.0, 310.0, 305.0, 302.0, 299.0, 301.0], compiled=True)]  # ~215k tokens/s
    slow = [_row("loramux_gates", 256, [500.0, 510.0, 505.0, 502.0, 499.0, 501.0], compiled=True)]  # ~130k
    rate = next(t for t in tt.verdicts(fast) if "target_tokens_per_s" in t)
    assert rate["verdict"] == "yes" and rate["searched"] is False and rate["tokens_per_s"]["low"] > 150_000
    assert "the only batch measured" in "\n".join(tt.targets_table([rate]))
    rate = next(t for t in tt.verdicts(slow) if "target_tokens_per_s" in t)
    assert rate["verdict"] is None and "no search" in rate["reason"]


def test_bf16_against_fp32_where_a_run_timed_both():
    rows = [_row("peft_single", 64, [100.0, 100.0, 100.0]), _row("loramux_joint", 64, [90.0, 91.0, 92.0]),
            {**_row("loramux_joint", 64, [150.0, 151.0, 149.0]), "precision": "fp32"},
            _row("loramux_gates", 64, [150.0, 150.0, 150.0]),
            {**_row("loramux_gates", 64, [140.0, 160.0, 150.0]), "precision": "fp32"},
            {**_row("peft_single", 64, [200.0, 200.0, 200.0]), "precision": "fp32"}]
    got = {t["variant"]: t for t in tt.verdicts(rows) if "precision_ratio" in t}
    assert set(got) == {"loramux_joint", "loramux_gates"}  # loramux variants only, each in the form it ran
    assert got["loramux_joint"]["verdict"] == "yes" and got["loramux_joint"]["ratio"]["low"] > 1.6
    assert got["loramux_gates"]["verdict"] == "inconclusive"  # 0.93..1.07 over the paired rounds
    assert "loramux_joint bf16 faster than fp32 at batch 64 (eager)" in "\n".join(tt.targets_table(got.values()))
    assert not any("precision_ratio" in t for t in tt.verdicts(rows[:2] + rows[3:4]))  # no fp32 row, no check


def test_settings_cover_every_form_but_a_compiled_capture():
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"variants": ["peft_single", "loramux_gates"], "precisions": ["bf16"],
                            "compiled": [False, True], "graphs": [False, True], "batch_sizes": [16, 64],
                            "compile_modes": ["default", "reduce-overhead"],
                            "extra_variants": ["loramux_gates"], "extra_batch_sizes": [256]})
    got = {(s.variant, s.compiled, s.graph, s.compile_mode, s.batch_size) for s in tt.settings_from(cfg)}
    # a captured step runs the eager layers; a compile mode belongs to compiled layers only
    forms = {(False, False, None), (True, False, None), (True, False, "reduce-overhead"), (False, True, None)}
    assert got == {(v, *f, b) for v in ("peft_single", "loramux_gates") for f in forms for b in (16, 64)} | {
        ("loramux_gates", *f, 256) for f in forms}
    assert len(tt.settings_from(cfg)) == len(got)
    cfg.compiled_graph = True  # asked for: compiled layers inside the captured step too
    both = {(s.variant, s.compiled, s.graph, s.compile_mode, s.batch_size) for s in tt.settings_from(cfg)}
    # (not reduce-overhead: its own CUDA graphs cannot nest in the step's capture)
    assert both - got == {(v, True, True, None, b) for v in ("peft_single", "loramux_gates") for b in (16, 64)} | {
        ("loramux_gates", True, True, None, 256)}
    assert {s.label for s in tt.settings_from(cfg) if s.compile_mode} >= {
        "peft_single/bf16/compiled[reduce-overhead]/b16"}
    # inductor's autotuned GEMMs without CUDA graphs of their own nest in the captured step
    cfg.compile_modes, cfg.extra_batch_sizes = ["max-autotune-no-cudagraphs", "max-autotune"], []
    tuned = {(s.compiled, s.graph, s.compile_mode) for s in tt.settings_from(cfg) if s.variant == "peft_single"}
    assert tuned == {(False, False, None), (False, True, None), (True, False, "max-autotune-no-cudagraphs"),
                     (True, True, "max-autotune-no-cudagraphs"), (True, False, "max-autotune")}
    # graphs [true] alone: the eager layers captured, the compiled layers uncaptured (each one's best form)
    cfg.compiled_graph, cfg.graphs, cfg.compile_modes = False, [True], ["default"]
    assert [(s.compiled, s.graph) for s in tt.settings_from(cfg) if s.variant == "peft_single" and s.batch_size == 16] \
        == [(False, True), (True, False)]


@pytest.mark.slow  # real training subprocesses: tens of seconds
def test_stage_writes_the_table_on_the_cpu_stand_in(tmp_path):
    cmd = [sys.executable, "-m", "pipeline.bench", "experiment=train_throughput", "print_config=false",
           "bench.shapes=[smollm2_135m_tiny]", "bench.train.compile_backend=eager", f"bench.table_dir={tmp_path}",
           "bench.train.variants=[peft_single,loramux_single,loramux_gates]", "bench.train.batch_sizes=[2]",
           "bench.train.extra_batch_sizes=[3]", "bench.train.seq_len=8", "bench.train.num_adapters=3",
           "bench.train.warmup=1", "bench.train.steps=1", "bench.train.repeats=2", "bench.train.precisions=[fp32]",
           "bench.train.graphs=[false]", "bench.train.compile_modes=[default]",
           "bench.train.table_name=train_throughput_batches", f"hydra.run.dir={tmp_path / 'run'}"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    doc = json.loads((tmp_path / "train_throughput_batches.json").read_text())  # bench.train.table_name
    labels = {(r["variant"], r["compiled"], r["batch_size"]) for r in doc["rows"]}
    assert labels == {(v, c, 2) for v in ("peft_single", "loramux_single", "loramux_gates") for c in (False, True)} | {
        ("loramux_gates", c, 3) for c in (False, True)}
    for r in doc["rows"]:
        assert r["tokens_per_s"] > 0 and len(r["ms_per_step_rounds"]) == 2
        assert (r["graph_breaks"] == 0) if r["compiled"] else r["graph_breaks"] is None
    assert doc["provenance"]["git_sha"] not in ("", "unknown") and doc["config"]["shape"] == "smollm2_135m_tiny"
    assert doc["targets"] == tt.verdicts(doc["rows"])
    assert (tmp_path / "train_throughput_batches.md").read_text() == tt.markdown(doc)
    assert "experiment=train_throughput bench.train.table_name=train_throughput_batches`" in tt.markdown(doc)


@pytest.mark.parametrize("committed", sorted(COMMITTED.parent.glob("train_throughput*.json")), ids=lambda p: p.stem)
def test_committed_table_is_rebuilt_from_its_rows(committed):
    doc = json.loads(committed.read_text())
    assert doc["provenance"]["git_sha"] not in ("", "unknown") and doc["provenance"]["device"].startswith("cuda:")
    rows = [dict(r) for r in doc["rows"]]
    tt.add_ratios(rows)
    assert rows == doc["rows"] and tt.verdicts(rows) == doc["targets"]
    assert committed.with_suffix(".md").read_text() == tt.markdown(doc)


def _cuda_tiny_shape():
    """The GPU tests' model: the tiny SmolLM2-shaped stand-in on CUDA (fp32, seed 0) and a LoRA config for it."""
    import torch
    from omegaconf import OmegaConf

    from pipeline.stages.bench import SHAPES, shape_model

    device = torch.device("cuda")
    config = SHAPES["smollm2_135m_tiny"][0]
    adapter = OmegaConf.create({"_target_": "peft.LoraConfig", "r": 4, "lora_alpha": 8, "lora_dropout": 0.0,
                                "target_modules": ["q_proj", "v_proj", "down_proj"], "task_type": "CAUSAL_LM"})

    def make_model():
        torch.manual_seed(0)
        return shape_model(config, device, torch.float32)

    return device, config, adapter, make_model


@pytest.mark.gpu
def test_a_replayed_cuda_graph_step_trains_as_the_eager_step():
    """The whole step captured once and replayed (graph=True) updates the trained parameters as eager steps do, for
    peft and for the routed variants (their routing is read inside the graph)."""
    import tempfile

    import torch

    from pipeline.stages.bench_timing import random_adapter

    device, config, adapter, make_model = _cuda_tiny_shape()

    ids = torch.randint(10, config["vocab_size"] - 10, (4, 16), generator=torch.Generator().manual_seed(1)).to(device)
    with tempfile.TemporaryDirectory() as tmp:
        adir = random_adapter(make_model(), Path(tmp) / "a", adapter, seed=0)
        for variant in ("peft_single", "loramux_joint", "loramux_gates"):
            trained = []
            for graph, calls in ((False, 5), (True, 5)):  # graph: the capture's warm-up steps are undone
                s = tt.Setting(variant, "fp32", False, 4, graph)
                tr = tt.build_trainee(s, make_model, adir, 3, 2, device, "inductor")
                for _ in range(calls):
                    tr.step(ids)
                trained.append([p.detach().clone() for p in tr.params])
            for a, b in zip(*trained):
                assert torch.allclose(a, b, atol=1e-5, rtol=1e-4), variant


@pytest.mark.gpu
def test_settings_sharing_one_graph_pool_each_train_as_their_eager_step():
    """Two captured settings whose graphs share one memory pool (as a benchmark run's settings do), replayed in
    turns in both orders, each update their parameters as their own eager steps do: a graph's temporaries in memory
    another graph's capture freed never reach what either keeps."""
    import tempfile

    import torch

    from pipeline.runtime.step_graph import GraphPool
    from pipeline.stages.bench_timing import random_adapter

    device, config, adapter, make_model = _cuda_tiny_shape()

    g = torch.Generator().manual_seed(2)
    batches = [torch.randint(10, config["vocab_size"] - 10, (4, 16), generator=g).to(device) for _ in range(4)]
    variants = ("peft_single", "loramux_gates")
    with tempfile.TemporaryDirectory() as tmp:
        adir = random_adapter(make_model(), Path(tmp) / "a", adapter, seed=0)
        eager = {}
        for v in variants:
            tr = tt.build_trainee(tt.Setting(v, "fp32", False, 4, False), make_model, adir, 3, 2, device, "inductor")
            for ids in batches:
                tr.step(ids)
            eager[v] = [p.detach().clone() for p in tr.params]
        pool = GraphPool(device)
        shared = {v: tt.build_trainee(tt.Setting(v, "fp32", False, 4, True), make_model, adir, 3, 2, device,
                                      "inductor", pool.handle) for v in variants}
        for i, ids in enumerate(batches):
            for v in (variants if i % 2 == 0 else variants[::-1]):
                shared[v].step(ids)
        for v in variants:
            for a, b in zip(eager[v], shared[v].params):
                assert torch.allclose(a, b.detach(), atol=1e-5, rtol=1e-4), v
            shared[v].release(4)
        # the next batch size, as a benchmark's next phase: every graph of the first pool is gone, so the settings
        # capture into a new one (a capture into a pool whose last graph was freed fails inside the allocator)
        second = GraphPool(device)
        for v in variants:
            shared[v].graphs.share_pool(second.handle)
        wide = torch.randint(10, config["vocab_size"] - 10, (8, 16), generator=g).to(device)
        for v in variants:
            shared[v].step(wide)
            assert shared[v].graphs.fallback is None and shared[v].graphs.shapes == [(8, 16)], v


def test_a_step_graph_on_the_cpu_is_one_clear_error():
    import torch

    from pipeline.runtime.step_graph import StepGraphs

    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))])
    with pytest.raises(ValueError, match="a CUDA graph needs a CUDA device, got cpu"):
        StepGraphs(lambda ids: None, opt, "cpu")


def test_each_round_starts_at_the_next_setting():
    from pipeline.stages.bench_timing import round_order

    names = ["a", "b", "c"]
    assert [round_order(names, i) for i in range(4)] == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"],
                                                          ["a", "b", "c"]]
    assert round_order([], 3) == [] and names == ["a", "b", "c"]  # a new list; the given one stays as it was
