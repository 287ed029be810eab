"""models.graph_generate against MultiLoRAModel.generate: the same greedy tokens, for every kind of router.

On the CPU the static-cache loop runs without capture (``capture=False``), which is the code a CUDA graph records:
prefill with generate's position ids, decode through the fixed 4-D mask and position buffers, EOS and padding of
finished rows. Left-padded prompts of different lengths; an "EOS" that the model does produce, so rows stop at
different steps and the loop stops when all have.
"""

import pytest
import torch
from needs_assets import needs_bigbench
from transformers import LogitsProcessor, LogitsProcessorList

from models import MultiLoRAModel, load_base_model
from models.graph_generate import graph_generate, supports
from models.tiny import save_test_assets

PROMPTS = ["hello world, this is a test", "[INST] what is 2+2? [/INST]\n", "abc"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return save_test_assets(tmp_path_factory.mktemp("graph_generate"))


class Record(LogitsProcessor):
    """Keeps every step's scores (returned unchanged): the two loops must see the same logits, not only the same
    argmax (greedy tokens of a tiny random model hide small errors, e.g. a position off by one)."""

    def __init__(self):
        self.scores = []

    def __call__(self, input_ids, scores):
        self.scores.append(scores.clone())
        return scores


def _mm(assets, router, **kw):
    base, dirs = assets
    model, tok = load_base_model(base)
    torch.manual_seed(0)  # fresh gates / router weights
    return MultiLoRAModel.from_adapters(model, {n: str(d) for n, d in dirs.items()}, router=router, tokenizer=tok,
                                        **kw).eval()


@pytest.mark.parametrize("router, kw, task_ids", [
    ("oracle", {}, ["a", "b", "c"]),
    ("oracle", {}, ["b", "b", "b"]),          # one adapter for every row: the uniform route
    ("meteora", {"top_k": 2}, None),
    ("dlp", {"hidden": 32, "layers": 1}, None),
    ("merge", {}, None),
])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])  # a boolean decode mask, an additive one
def test_same_tokens_as_generate(assets, router, kw, task_ids, attention):
    mm = _mm(assets, router, **kw)
    mm.model.config._attn_implementation = attention
    assert supports(mm)
    tok = mm.tokenizer
    batch = tok(PROMPTS, return_tensors="pt", padding=True)
    assert tok.padding_side == "left" and (batch["attention_mask"] == 0).any()  # really left-padded
    route = {"task_ids": task_ids} if task_ids else {}
    free = mm.generate(**batch, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id,
                       eos_token_id=None, **route)
    eos = int(free[0, batch["input_ids"].shape[1] + 3])  # row 0's 4th new token: rows now stop at different steps
    seen, saw = Record(), Record()
    want = mm.generate(**batch, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id,
                       eos_token_id=eos, logits_processor=LogitsProcessorList([seen]), **route)
    got = graph_generate(mm, batch["input_ids"], batch["attention_mask"], max_new_tokens=12, eos_token_id=eos,
                         pad_token_id=tok.pad_token_id, task_ids=task_ids, logits_processor=[saw], capture=False)
    assert got.shape == want.shape, (got.shape, want.shape)
    assert torch.equal(got, want)
    assert len(saw.scores) == len(seen.scores) == want.shape[1] - batch["input_ids"].shape[1]
    unfinished = torch.ones(len(PROMPTS), dtype=torch.bool)  # a finished row's scores are not used by either
    for a, b, t in zip(saw.scores, seen.scores, want[:, batch["input_ids"].shape[1]:].T, strict=True):
        torch.testing.assert_close(a[unfinished], b[unfinished], atol=1e-4, rtol=1e-4)
        unfinished &= t != eos


def test_plain_and_peft_models_decode_as_their_generate(assets):
    """The benchmarks' base and peft rows go through the same loop: a transformers model and a PeftModel, with no
    EOS (exactly max_new_tokens, as a latency run asks)."""
    from peft import PeftModel

    base, dirs = assets
    model, tok = load_base_model(base)
    batch = tok(PROMPTS, return_tensors="pt", padding=True)
    for m in (model, PeftModel.from_pretrained(load_base_model(base)[0], str(dirs["a"])).eval()):
        want = m.generate(**batch, max_new_tokens=9, min_new_tokens=9, do_sample=False,
                          pad_token_id=tok.pad_token_id)
        got = graph_generate(m, batch["input_ids"], batch["attention_mask"], max_new_tokens=9, eos_token_id=None,
                             pad_token_id=tok.pad_token_id, capture=False)
        assert torch.equal(got, want)


def test_phases_split_a_call_without_changing_its_tokens(assets):
    """``phases`` times the prefill and the decode steps of a call (uncaptured on the CPU: no first step or capture
    phase) and counts the steps after the first token; the tokens are those of the same call without it."""
    from models.graph_generate import PHASES

    base, _ = assets
    model, tok = load_base_model(base)
    batch = tok(PROMPTS, return_tensors="pt", padding=True)
    kw = {"max_new_tokens": 5, "eos_token_id": None, "pad_token_id": tok.pad_token_id, "capture": False}
    want = graph_generate(model, batch["input_ids"], batch["attention_mask"], **kw)
    phases: dict = {}
    got = graph_generate(model, batch["input_ids"], batch["attention_mask"], phases=phases, **kw)
    assert torch.equal(got, want)
    assert set(phases) == {"prefill", "replay", "replayed_steps"} and set(phases) - {"replayed_steps"} <= set(PHASES)
    assert phases["replayed_steps"] == 4 and all(phases[k] > 0 for k in ("prefill", "replay"))
    one: dict = {}
    graph_generate(model, batch["input_ids"], batch["attention_mask"], phases=one, **{**kw, "max_new_tokens": 1})
    assert set(one) == {"prefill"}  # one token: the prefill's only


def test_engine_checks_its_first_call_and_falls_back_on_a_disagreement(assets, monkeypatch):
    """pipeline.stages.decode_engine: auto's first call is checked against generate (recorded); a graph decode that
    disagrees (here: one whose tokens are shifted) hands the run to generate, which gives this call's answer too."""
    from pipeline.stages import decode_engine
    from pipeline.stages.decode_engine import DecodeEngine

    mm = _mm(assets, "oracle")
    tok = mm.tokenizer
    batch = tok(PROMPTS, return_tensors="pt", padding=True)
    kw = {"max_new_tokens": 6, "pad_token_id": tok.pad_token_id, "eos_token_id": None, "task_ids": ["a", "b", "c"]}
    want = mm.generate(**batch, do_sample=False, **kw)
    engine = DecodeEngine("graph", mm)
    engine.to_check = True  # as auto on CUDA
    assert torch.equal(engine(mm, batch["input_ids"], batch["attention_mask"], **kw), want)
    record = engine.record()
    assert {k: record[k] for k in ("generation_engine", "graph_check")} == {
        "generation_engine": "graph",
        "graph_check": {"rows": 3, "rows_equal": 3, "rows_near_tie": 0, "tokens_compared": 6, "parted": []}}
    phases = record["graph_phases"]  # one call: its prefill, then 5 decode steps uncaptured on the CPU
    assert phases["calls"] == 1 and phases["replayed_steps"] == 5 and phases["prefill"] > 0 and phases["replay"] > 0

    real = decode_engine.graph_generate
    monkeypatch.setattr(decode_engine, "graph_generate", lambda *a, **k: real(*a, **k).roll(1, dims=1))
    engine = DecodeEngine("graph", mm)
    engine.to_check = True
    assert torch.equal(engine(mm, batch["input_ids"], batch["attention_mask"], **kw), want)
    assert engine.name == "generate" and engine.check["rows_equal"] == 0

    # generate runs only the tokens the check compares (CHECK_TOKENS); a disagreement then runs the whole call
    monkeypatch.setattr(decode_engine, "CHECK_TOKENS", 2)
    engine = DecodeEngine("graph", mm)
    engine.to_check = True
    assert torch.equal(engine(mm, batch["input_ids"], batch["attention_mask"], **kw), want)
    assert engine.name == "generate" and engine.check["tokens_compared"] == 2
    assert DecodeEngine("auto", mm).name == "generate"  # the CPU: generate


class Tie(LogitsProcessor):
    """At new token ``step``, scores row 0's token ``a`` at ``TOP`` and token ``b`` at ``TOP + apart``, above every
    other token: generate takes ``b``, or ``a`` (argmax's first) on an exact tie."""

    TOP = 1000.0

    def __init__(self, prompt_len: int, step: int, a: int, b: int, apart: float):
        self.col, self.a, self.b, self.apart = prompt_len + step, a, b, apart

    def __call__(self, input_ids, scores):
        if input_ids.shape[1] == self.col:
            scores = scores.clone()
            scores[0, self.a], scores[0, self.b] = self.TOP, self.TOP + self.apart
        return scores


@pytest.mark.parametrize("apart", [0.0, 2**-13, 0.5])
def test_engine_check_lets_a_row_part_at_a_near_tie_and_no_further(assets, monkeypatch, apart):
    """A graph decode whose row 0 takes the other of two tokens that generate's scores put within the tolerance (an
    exact tie; 2^-13 apart at 1000, two fp32 steps there, under fp32's 4 x 1.2e-7 x 1000) agrees: the run keeps the
    graph, and the check records where and by how much the row parted. Half a logit apart is no near-tie: 2 of 3
    rows agree, and the run falls back to generate, whose tokens this call returns."""
    from pipeline.stages import decode_engine
    from pipeline.stages.decode_engine import NEAR_TIE_EPS, DecodeEngine

    mm = _mm(assets, "oracle")
    tok = mm.tokenizer
    batch = tok(PROMPTS, return_tensors="pt", padding=True)
    P, step, a, b = batch["input_ids"].shape[1], 2, 5, 7
    tie = Tie(P, step, a, b, apart)
    kw = {"max_new_tokens": 6, "pad_token_id": tok.pad_token_id, "eos_token_id": None, "task_ids": ["a", "b", "c"],
          "logits_processor": [tie]}
    want = mm.generate(**batch, do_sample=False, **{**kw, "logits_processor": LogitsProcessorList([tie])})
    assert int(want[0, P + step]) == (b if apart else a)
    other = a if apart else b
    real = decode_engine.graph_generate

    def parted(*args, **kwargs):  # the graph's tokens, row 0 taking the other of the two at `step`
        out = real(*args, **kwargs)
        out[0, P + step] = other
        return out

    monkeypatch.setattr(decode_engine, "graph_generate", parted)
    engine = DecodeEngine("graph", mm)
    engine.to_check = True
    got = engine(mm, batch["input_ids"], batch["attention_mask"], **kw)
    check = engine.check
    assert check["rows_equal"] == 2 and len(check["parted"]) == 1
    row = check["parted"][0]
    assert (row["row"], row["step"]) == (0, step)
    assert row["margin"] == pytest.approx(apart, abs=1e-5)
    eps = torch.finfo(torch.float32).eps
    assert row["tolerance"] == pytest.approx(NEAR_TIE_EPS * eps * (Tie.TOP + apart), rel=1e-3)
    if apart < 0.5:
        assert row["near_tie"] and check["rows_near_tie"] == 1 and engine.name == "graph"
        assert int(got[0, P + step]) == other  # the graph's tokens
    else:
        assert not row["near_tie"] and check["rows_near_tie"] == 0 and engine.name == "generate"
        assert torch.equal(got, want)


def test_bf16_autocast_keys_and_values_share_the_cache_dtype(assets):
    """Under bf16 autocast the keys leave the rotary embedding in fp32 and the values stay bf16; transformers 5.17's
    static layer sizes both buffers from the keys and refused the values (index_copy_ dtype error on an H200).
    Outside autocast the cache stores the values in the keys' dtype (exact; under autocast both in bf16: the next
    test), and the decode still equals generate's tokens, its step logits within bf16 rounding (the static cache's
    attention reduces over more, masked, keys)."""
    from models.graph_generate import _static_layer

    layer = _static_layer(4)
    k = torch.randn(1, 2, 3, 8)
    v = torch.randn(1, 2, 3, 8).bfloat16()
    keys, values = layer.update(k, v, cache_kwargs={"cache_position": torch.arange(3)})
    assert values.dtype == keys.dtype == torch.float32
    assert torch.equal(values[:, :, :3], v.float())

    mm = _mm(assets, "meteora", top_k=2)
    tok = mm.tokenizer
    batch = tok(PROMPTS, return_tensors="pt", padding=True)
    kw = {"max_new_tokens": 6, "pad_token_id": tok.pad_token_id, "eos_token_id": None}
    rec_want, rec_got = Record(), Record()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = mm.generate(**batch, do_sample=False, logits_processor=LogitsProcessorList([rec_want]), **kw)
        got = graph_generate(mm, batch["input_ids"], batch["attention_mask"], capture=False,
                             logits_processor=[rec_got], **kw)
    assert torch.equal(got, want)
    for a, b in zip(rec_got.scores, rec_want.scores, strict=True):
        torch.testing.assert_close(a, b, atol=2e-2, rtol=2e-2)


def test_under_autocast_the_cache_holds_bf16_and_the_logits_do_not_change(assets, monkeypatch):
    """Under bf16 autocast the attention casts keys and values to bf16 anyway, so the static cache stores them in
    bf16: half the bytes of an fp32 cache, and the same tokens and step logits to the bit as a cache that keeps the
    keys in fp32 (and the values cast up to them)."""
    from transformers.cache_utils import StaticLayer

    from models import graph_generate as gg

    layer = gg._static_layer(4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        keys, values = layer.update(torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8).bfloat16(),
                                    cache_kwargs={"cache_position": torch.arange(3)})
    assert keys.dtype == values.dtype == torch.bfloat16

    class Fp32Layer(StaticLayer):  # the keys' dtype for both, under autocast too
        def update(self, key_states, value_states, *args, **kwargs):
            return super().update(key_states, value_states.to(key_states.dtype), *args, **kwargs)

    mm = _mm(assets, "meteora", top_k=2)
    tok = mm.tokenizer
    batch = tok(PROMPTS, return_tensors="pt", padding=True)
    kw = {"max_new_tokens": 6, "pad_token_id": tok.pad_token_id, "eos_token_id": None}
    runs = {}
    for name in ("bf16", "fp32"):
        if name == "fp32":
            monkeypatch.setattr(gg, "_static_layer", lambda n: Fp32Layer(max_cache_len=n))
        rec = Record()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = gg.graph_generate(mm, batch["input_ids"], batch["attention_mask"], capture=False,
                                    logits_processor=[rec], **kw)
        runs[name] = (out, rec.scores)
    assert torch.equal(runs["bf16"][0], runs["fp32"][0])
    assert all(torch.equal(a, b) for a, b in zip(runs["bf16"][1], runs["fp32"][1], strict=True))


def test_a_decode_signature_changes_with_whatever_a_capture_would_lay_out(assets):
    """A warm call (graph_generate on CUDA: no eager first step) is taken only where the signature equals one a
    warm-up left. It must be the same for a repeated call and differ with the shapes, the router (another one, its
    knobs, trained gates), the task ids, a prefill decision's width, the bank version and a group's shrink rows."""
    from models.graph_generate import _decode_signature

    mm = _mm(assets, "oracle", group_projections=True)
    tok = mm.tokenizer
    batch = tok(PROMPTS, return_tensors="pt", padding=True)

    def sig(task_ids=None, n=3):
        with mm.routing(task_ids, None, None, 3), torch.no_grad():
            mm(**batch)  # a prefill: sentence routers decide, groups lay out what the route reads
            return _decode_signature(mm, True, 3, batch["input_ids"].shape[1], n)

    first = sig(["a", "a", "a"])
    assert sig(["a", "a", "a"]) == first
    assert sig(["a", "a", "a"], n=4) != first
    assert sig(["b", "b", "b"]) != first  # another uniform adapter: other shrink rows
    assert sig(["a", "b", "c"]) != first
    mm.set_router("meteora", top_k=2)
    gates = sig()
    assert gates != first and sig() == gates
    mm.set_router(mm.router.__class__(mm.ctx, top_k=1))
    assert sig() != gates
    with torch.no_grad():
        next(mm.router.parameters()).add_(0.01)  # a gate that trained: its rows must be laid out again
    top1 = sig()
    assert sig() == top1
    with torch.no_grad():
        next(mm.router.parameters()).add_(0.01)
    assert sig() != top1
    mm.set_router("dlp", hidden=32, layers=1, max_kept=1)
    one = sig()
    assert sig() == one and mm.router._seq[0].shape[1] == 1
    mm.router.max_kept = None  # a wider nucleus: another knob, and decisions of another width
    assert sig() != one
    mm.router.max_kept = 1
    mm.bank.version += 1  # the bank changed (a hot swap): every layout is stale
    assert sig() != one
    plain, _ = load_base_model(assets[0])
    a = _decode_signature(plain, False, 3, 5, 3)
    assert a == _decode_signature(plain, False, 3, 5, 3) and a != _decode_signature(plain, False, 3, 5, 4)


@pytest.mark.parametrize("mode", ["warm_start", "keep_graph"])
@pytest.mark.parametrize("grouped", [False, True], ids=["ungrouped", "grouped"])
def test_warm_and_kept_graph_calls_decode_as_generate_across_routers_and_prompts(assets, grouped, mode):
    """The warm start and the kept graphs' bookkeeping on the CPU (``simulate_graphs``: a captured call's step
    closure replayed in place of a CUDA graph, reading that call's tensors as the graph would): call after call on
    one model while the router, the task ids and the prompts change, generate's tokens; a repeated call takes no
    eager first step (and, kept, no capture). A later call's prompt reaches the kept cache and buffers, and a
    sentence router's new decision the tensors the kept step reads: else its tokens would be the first call's."""
    from models.graph_generate import release_graphs, simulate_graphs

    mm = _mm(assets, "oracle", group_projections=grouped)
    tok = mm.tokenizer
    torch.manual_seed(0)
    routers = {"oracle": mm.router, "meteora": mm.build_router("meteora", top_k=2),
               "dlp": mm.build_router("dlp", hidden=32, layers=1, max_kept=2)}
    prompts = [PROMPTS, PROMPTS[::-1]]  # the same padded length, other rows: a stale cache or decision shows
    # four (router, task ids) keys: every kept graph stays (KEPT_GRAPHS); consecutive calls of one router are warm
    plan = [("dlp", None, 0), ("dlp", None, 1), ("oracle", ["a", "a", "a"], 0), ("meteora", None, 0),
            ("oracle", ["b", "b", "b"], 1), ("dlp", None, 0), ("oracle", ["a", "a", "a"], 1), ("meteora", None, 1),
            ("dlp", None, 0), ("dlp", None, 1)]
    warm = []
    with simulate_graphs():
        for name, task_ids, which in plan:
            mm.set_router(routers[name])
            batch = tok(prompts[which], return_tensors="pt", padding=True)
            route = {"task_ids": task_ids} if task_ids else {}
            want = mm.generate(**batch, max_new_tokens=6, min_new_tokens=6, do_sample=False, eos_token_id=None,
                               pad_token_id=tok.pad_token_id, **route)
            phases: dict = {}
            got = graph_generate(mm, batch["input_ids"], batch["attention_mask"], max_new_tokens=6,
                                 eos_token_id=None, pad_token_id=tok.pad_token_id, task_ids=task_ids, capture=True,
                                 phases=phases, **{mode: True})
            assert torch.equal(got, want), (name, task_ids, which)
            warm.append("first_step" not in phases and (mode == "warm_start" or "capture" not in phases))
    assert warm[0] is False and warm[1] and warm[9], warm  # DLP again at the same shapes: other prompts, warm
    if mode == "keep_graph":
        assert 0 < len(mm.__dict__["_lmx_kept_graphs"]) <= 4
        release_graphs(mm)
        assert "_lmx_kept_graphs" not in mm.__dict__


@pytest.mark.slow
@needs_bigbench
def test_engine_check_passes_the_real_model_in_bf16_on_composite_prompts():
    """SmolLM2 under bf16 autocast on composite-3 prompts in MeteoRA's format (free text: every row runs all the
    check's tokens, where bf16 near-ties flip greedy choices; on the development CPU 2 of these 4 rows part from
    generate's within the first 32 tokens): every row agrees, equal or parted at a near-tie, so the run keeps the
    graph."""
    from data.assets import cache_dir
    from data.batches import encode_prompts, left_pad
    from data.composite import build_composite
    from pipeline.stages.decode_engine import CHECK_TOKENS, DecodeEngine
    from pipeline.stages.eos_gate import EOSUntilAnswers

    model, tok = load_base_model(cache_dir() / "models" / "SmolLM2-135M-Instruct")
    ds = build_composite("composite3", rows=4, repeat_short=True)
    ids, mask = left_pad(encode_prompts(tok, list(ds["prompt"])), tok.pad_token_id)
    engine = DecodeEngine("graph", model)
    engine.to_check = True
    with torch.autocast("cpu", dtype=torch.bfloat16):
        engine(model, ids, mask, max_new_tokens=CHECK_TOKENS, pad_token_id=tok.pad_token_id,
               eos_token_id=tok.eos_token_id, logits_processor=[EOSUntilAnswers(tok, ids.shape[1], 3)])
    check = engine.check
    assert check["tokens_compared"] == CHECK_TOKENS
    assert all(p["near_tie"] for p in check["parted"]), check["parted"]
    assert check["rows_equal"] + check["rows_near_tie"] == 4 and engine.name == "graph"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_gqa_decode_attention_is_repeated_kv_attention(dtype):
    """models.attention's decode attention: one query token per row over grouped KV heads, packed per KV head,
    equals SDPA over keys and values repeated per query head (what transformers 5.17 runs), float64 to rounding;
    masked-out positions (left padding, cache positions not written yet: zeros in a static cache, huge here) never
    reach the output."""
    from transformers.integrations.sdpa_attention import repeat_kv

    from models.attention import _gqa_decode_forward

    torch.manual_seed(0)
    b, kv, groups, length, dim = 3, 3, 3, 11, 8
    q = torch.randn(b, kv * groups, 1, dim, dtype=dtype)
    k = torch.randn(b, kv, length, dim, dtype=dtype)
    v = torch.randn(b, kv, length, dim, dtype=dtype)
    mask = torch.ones(b, 1, 1, length, dtype=torch.bool)
    mask[0, ..., :4] = False  # left padding
    mask[:, ..., 9:] = False  # static cache positions not written yet
    k[:, :, 9:], v[:, :, 9:] = 1e4, 1e4

    class Module:
        num_key_value_groups = groups

    got, _ = _gqa_decode_forward(Module(), q, k, v, mask, scaling=0.3)
    want = torch.nn.functional.scaled_dot_product_attention(
        q, repeat_kv(k[:, :, :9], groups), repeat_kv(v[:, :, :9], groups), attn_mask=mask[..., :9], scale=0.3)
    assert got.shape == (b, 1, kv * groups, dim)
    tol = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(got, want.transpose(1, 2), atol=tol, rtol=tol)


def test_graph_generate_attends_through_gqa_decode_and_gives_the_model_back(assets, monkeypatch):
    """The tiny LLaMA (4 query heads on 2 KV heads) decodes through the packed attention (every decode step of every
    layer, none of the prefill), with generate's tokens, and leaves the model on SDPA."""
    from models import attention

    model, tok = load_base_model(assets[0])
    assert model.config._attn_implementation == "sdpa" and model.config.num_key_value_heads == 2
    calls = []
    real = attention._gqa_decode_forward

    def spy(module, query, *args, **kwargs):
        calls.append(query.shape[2])
        return real(module, query, *args, **kwargs)

    monkeypatch.setattr(attention, "_gqa_decode_forward", spy)
    batch = tok(PROMPTS, return_tensors="pt", padding=True)
    kw = {"max_new_tokens": 5, "eos_token_id": None, "pad_token_id": tok.pad_token_id}
    want = model.generate(**batch, do_sample=False, min_new_tokens=5, **kw)
    got = graph_generate(model, batch["input_ids"], batch["attention_mask"], capture=False, **kw)
    assert torch.equal(got, want)
    layers = model.config.num_hidden_layers
    assert calls == [batch["input_ids"].shape[1]] * layers + [1] * (4 * layers)
    assert model.config._attn_implementation == "sdpa"


def test_gqa_decode_gives_every_config_its_own_attention_back():
    """A multimodal config (Gemma 3: text and vision sub-configs): the top config's setter sets its sub-configs, so
    on entering, the text config follows it onto the decode attention but a vision config on eager stays there, and
    on leaving each one has its own implementation again."""
    from types import SimpleNamespace

    from transformers import Gemma3Config

    from models.attention import DECODE, gqa_decode

    config = Gemma3Config()
    config._attn_implementation = "sdpa"
    config.vision_config._attn_implementation = "eager"
    model = SimpleNamespace(config=config)
    with gqa_decode(model):
        assert config._attn_implementation == config.text_config._attn_implementation == DECODE
        assert config.vision_config._attn_implementation == "eager"
    assert config._attn_implementation == config.text_config._attn_implementation == "sdpa"
    assert config.vision_config._attn_implementation == "eager"
    config._attn_implementation = "eager"  # not on SDPA: left alone
    with gqa_decode(model):
        assert config._attn_implementation == config.text_config._attn_implementation == "eager"


def test_a_kept_graph_serves_only_calls_whose_cache_dtype_is_its_own(assets):
    """A graph kept under bf16 autocast holds a bf16 cache; a later call of the same shapes without autocast makes
    its own fp32 cache (the kept one would refuse its fp32 keys), and both decode as generate."""
    from models.graph_generate import release_graphs, simulate_graphs

    mm = _mm(assets, "oracle")
    tok = mm.tokenizer
    batch = tok(PROMPTS, return_tensors="pt", padding=True)
    kw = {"max_new_tokens": 5, "eos_token_id": None, "pad_token_id": tok.pad_token_id, "task_ids": ["a", "b", "c"]}
    want = mm.generate(**batch, do_sample=False, min_new_tokens=5, **kw)
    with simulate_graphs():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            graph_generate(mm, batch["input_ids"], batch["attention_mask"], keep_graph=True, **kw)
        got = graph_generate(mm, batch["input_ids"], batch["attention_mask"], keep_graph=True, **kw)
    release_graphs(mm)
    assert torch.equal(got, want)


def test_the_near_tie_tolerance_follows_the_precision_of_the_matmuls(assets):
    """fp32 weights at torch's "highest" matmul precision: fp32's epsilon; at "high" TF32's (10 mantissa bits), at
    "medium" bf16's; under bf16 autocast bf16's."""
    from pipeline.stages.decode_engine import compute_eps

    model, _ = load_base_model(assets[0])
    cpu = torch.device("cpu")
    before = torch.get_float32_matmul_precision()
    try:
        eps = {}
        for precision in ("highest", "high", "medium"):
            torch.set_float32_matmul_precision(precision)
            eps[precision] = compute_eps(model, cpu)
    finally:
        torch.set_float32_matmul_precision(before)
    assert eps == {"highest": torch.finfo(torch.float32).eps, "high": 2.0**-10,
                   "medium": torch.finfo(torch.bfloat16).eps}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert compute_eps(model, cpu) == torch.finfo(torch.bfloat16).eps
