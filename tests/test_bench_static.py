"""The bench's CUDA-only paths, run on CPU with the 8B shape's 2-layer stand-in: random bf16 LLaMA-3 geometry, the
static KV cache compiled by transformers' generate (dynamo's eager backend here), the fall-back to an uncompiled
static cache when compilation fails, and the exact-length check that keeps decode timings honest."""

from __future__ import annotations

import pytest
import torch
from hydra.core.global_hydra import GlobalHydra

from pipeline.runtime.compose import compose
from pipeline.stages.bench import LLAMA3_8B, SHAPES, ShapeBench, TimeBudget, shape_model
from pipeline.stages.bench_timing import compile_config, random_batch, time_generate, time_interleaved

CONF = str(__import__("pathlib").Path(__file__).resolve().parent.parent / "conf")


@pytest.fixture(scope="module")
def tiny8b():
    config, needs_cuda = SHAPES["llama3_8b_tiny"]
    assert not needs_cuda and SHAPES["llama3_8b"] == (LLAMA3_8B, True)
    same = {k for k in LLAMA3_8B if LLAMA3_8B[k] == config[k]}  # everything but depth and width is the 8B's
    assert same == set(LLAMA3_8B) - {"hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                                     "num_key_value_heads"}
    assert config["num_attention_heads"] // config["num_key_value_heads"] == 4  # the 8B's GQA ratio
    model = shape_model(config, "cpu")
    assert next(model.parameters()).dtype == torch.bfloat16 and model.config.vocab_size == 128256
    return model


def _bench_cfg(overrides):
    GlobalHydra.instance().clear()
    return compose("bench", ["bench.static.allow_on_cpu=true", "bench.new_tokens=3", "bench.warmup=0",
                             "bench.repeats=1", "bench.batch_sizes=[2]", "bench.prompt_lengths=[5]",
                             "bench.engines=[static]", *overrides])


def _run(model, overrides):
    rows: list = []
    sb = ShapeBench(_bench_cfg(overrides), "llama3_8b_tiny", model, 128256, torch.device("cpu"), "llama3_8b_tiny",
                    rows)
    sb.measure("base", 0, lambda i, m, **k: model.generate(input_ids=i, attention_mask=m, **k))
    return rows


def test_static_compiles_on_cpu_with_the_eager_backend(tiny8b):
    [row] = _run(tiny8b, ["bench.static.backend=eager"])
    assert row["engine"] == "static+compile" and row["decode_ms_per_token"] >= 0 and row["peak_mem_gb"] is None
    assert row["model"] == "llama3_8b_tiny" and (row["batch_size"], row["prompt_len"]) == (2, 5)


def test_failed_compile_falls_back_to_the_static_cache(tiny8b):
    [row] = _run(tiny8b, ["bench.static.backend=no_such_backend"])
    assert row["engine"] == "static"
    assert "_compiled_call" not in tiny8b.__dict__


def test_static_without_compile_and_the_static_filter(tiny8b):
    assert _run(tiny8b, ["bench.static.compile=false"])[0]["engine"] == "static"
    assert _run(tiny8b, ["bench.static.strategies=[dlp]"]) == []  # base is not in the static grid
    assert [r["engine"] for r in _run(tiny8b, ["bench.engines=[eager]", "bench.static.allow_on_cpu=false"])] == \
        ["eager"]


def test_static_generation_equals_eager(tiny8b):
    ids, mask = random_batch(128256, 2, 5, "cpu", seed=1)
    eager = tiny8b.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    static = tiny8b.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, min_new_tokens=4, do_sample=False,
                             cache_implementation="static",
                             compile_config=compile_config("eager", None, all_devices=True))
    assert torch.equal(eager, static)


def test_short_generation_is_an_error(tiny8b):
    ids, mask = random_batch(128256, 1, 4, "cpu")

    def stops_early(i, m, max_new_tokens, min_new_tokens, **kw):
        return tiny8b.generate(input_ids=i, attention_mask=m, max_new_tokens=1, **kw)
    with pytest.raises(RuntimeError, match="asked for exactly 3"):
        time_generate(stops_early, ids, mask, 3, warmup=0, repeats=1)


def test_interleaved_rounds_rotate_the_contestants_and_keep_every_pair():
    """time_interleaved: each contestant warms up alone (one 1-token call, ``warmup`` N-token calls), then round i
    runs one (1-token, N-token) pair of each, the order rotated by i; every pair comes back in ``rounds``."""
    calls = []

    def contestant(name):
        def gen(ids, mask, max_new_tokens, **kw):
            calls.append((name, max_new_tokens))
            return torch.cat([ids, ids.new_zeros(ids.shape[0], max_new_tokens)], 1)
        return gen
    ids, mask = random_batch(100, 1, 4, "cpu")
    out = time_interleaved({k: contestant(k) for k in "abc"}, ids, mask, 5, warmup=1, repeats=4)
    warm = [(k, n) for k in "abc" for n in (1, 5)]
    rounds = [(k, n) for order in ("abc", "bca", "cab", "abc") for k in order for n in (1, 5)]
    assert calls == warm + rounds
    assert all(len(out[k]["rounds"]) == 4 and all(t1 >= 0 and tn >= 0 for t1, tn in out[k]["rounds"]) for k in "abc")
    assert all(out[k]["decode_ms_per_token"] >= 0 and out[k]["peak_mem_gb"] is None for k in "abc")


def test_time_budget_skips_what_did_not_start(tiny8b):
    rows: list = []
    sb = ShapeBench(_bench_cfg(["bench.engines=[eager]"]), "llama3_8b_tiny", tiny8b, 128256, torch.device("cpu"),
                    "llama3_8b_tiny", rows, TimeBudget(1e-9))
    sb.measure("base", 0, lambda i, m, **k: tiny8b.generate(input_ids=i, attention_mask=m, **k))
    assert rows == [] and sb.budget.skipped == ["llama3_8b_tiny/eager/base/n0/b2/s5"]


@pytest.mark.gpu
def test_static_engine_compiles_every_strategy_on_cuda(tmp_path):
    """On the GPU: the 8B shape's stand-in through bench with inductor + CUDA graphs (what dlp_latency runs on the
    8B shape), every loramux strategy; a combination that fell back would say engine=static."""
    from pipeline.stages.bench import bench_shape

    cfg = _bench_cfg(["bench.engines=[eager,static]", "bench.static.allow_on_cpu=false", "bench.warmup=1",
                      "bench.strategies=[base,peft,oracle,meteora-top2,dlp]", "bench.num_adapters=[2]",
                      "adapter=dlp", "bench.new_tokens=8"])
    rows: list = []
    bench_shape(cfg, "llama3_8b_tiny", rows)
    engines = {(r["strategy"], r["engine"]) for r in rows}
    assert engines == {(s, e) for s in ("base", "peft", "oracle", "meteora-top2", "dlp")
                       for e in ("eager", "static+compile")}
    assert all(r["peak_mem_gb"] > 0 and r["decode_ms_per_token"] > 0 for r in rows)


@pytest.mark.parametrize("router", ["dlp", "meteora"])
def test_compiled_decode_of_a_routed_model_is_one_graph(tiny8b, tmp_path, router):
    """transformers compiles the decode step; with a router inside, it must still trace as one graph with no break
    (a break there, e.g. branching on the KV cache's length tensor, costs a host sync and a split graph per token)
    and generate the same tokens as eager."""
    import torch._dynamo

    from models import MultiLoRAModel
    from pipeline.stages.bench_timing import random_adapter

    cfg = _bench_cfg(["experiment=dlp_latency"])
    adapter = random_adapter(tiny8b, tmp_path / "a", cfg.adapter, 0)
    mm = MultiLoRAModel.from_adapters(tiny8b, {f"a{i}": adapter for i in range(3)}, router="base",
                                      check_base_name=False)
    try:
        mm.set_router(router, **({"top_k": 2} if router == "meteora" else {}))
        ids, mask = random_batch(128256, 2, 5, "cpu", seed=2)
        kw = {"max_new_tokens": 4, "min_new_tokens": 4, "do_sample": False}
        eager = mm.generate(ids, attention_mask=mask, **kw)
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        static = mm.generate(ids, attention_mask=mask, cache_implementation="static",
                             compile_config=compile_config("eager", None, all_devices=True), **kw)
        assert "_compiled_call" in tiny8b.__dict__
        assert dict(torch._dynamo.utils.counters["graph_break"]) == {}
        assert torch.equal(eager, static)
    finally:
        mm.unwrap()
        tiny8b.__dict__.pop("_compiled_call", None)
        torch._dynamo.reset()


def test_a_strategy_that_cannot_run_leaves_its_round_group_timed_without_it():
    """Eager rounds time a bank size's strategies together; dlp_segments reads the prompt's text, which a
    random-weight shape has no tokenizer for. It is reported and left out, and every other strategy of its group
    still gets its row (a group that failed as a whole left head_to_head's bench with no row at all)."""
    from pipeline.stages.bench import bench_shape

    cfg = _bench_cfg(["bench.engines=[eager]", "bench.strategies=[base,oracle,dlp_segments]",
                      "bench.num_adapters=[2]", "bench.repeats=2"])
    rows: list = []
    bench_shape(cfg, "llama3_8b_tiny", rows)
    assert {r["strategy"] for r in rows} == {"base", "oracle"}
    assert all(r["alongside"] == 2 and len(r["rounds"]) == 2 for r in rows)


def test_bank_rows_decode_on_the_grouped_model_as_evaluate_does():
    """bench.group_projections=true (auto on CUDA, as evaluate's generation.group_projections): the loramux rows
    decode with q / k / v and gate / up grouped, eager and under the static engine's compile, and say so; base and
    peft are never grouped; with false nothing is. MeteoRA's gates under compile route each projection themselves
    (``group_gates`` declines while compiling): its static+compile rows say not grouped."""
    from pipeline.stages.bench import bench_shape

    for on in (True, False):
        cfg = _bench_cfg(["bench.engines=[eager,static]", "bench.static.backend=eager",
                          "bench.strategies=[base,peft,dlp,meteora-top2]", "bench.num_adapters=[2]",
                          "bench.static.strategies=[dlp,meteora-top2]", f"bench.group_projections={str(on).lower()}"])
        rows: list = []
        bench_shape(cfg, "llama3_8b_tiny", rows)
        got = {(r["strategy"], r["engine"]): r["grouped"] for r in rows}
        assert got == {("base", "eager"): False, ("peft", "eager"): False, ("dlp", "eager"): on,
                       ("meteora-top2", "eager"): on, ("dlp", "static+compile"): on,
                       ("meteora-top2", "static+compile"): False}, got
    # DLP-LoRA's q / v bank: q / k / v group with k plain; MeteoRA packs q's and v's gates (none for k) and groups too
    cfg = _bench_cfg(["bench.engines=[eager]", "bench.strategies=[dlp,meteora-top2]", "bench.num_adapters=[2]",
                      "bench.group_projections=true", "adapter=dlp"])
    rows = []
    bench_shape(cfg, "llama3_8b_tiny", rows)
    assert {r["strategy"]: r["grouped"] for r in rows} == {"dlp": True, "meteora-top2": True}
