"""Router checkpoints, batched generation with every strategy, segment routing and option validation."""

import json

import pytest
import torch

from models import MultiLoRAModel, RouterCheckpointError, load_base_model
from models.routing.dlp_segments import segment_tokens
from models.tiny import save_test_assets

PROMPTS = ["[INST] count the apples [/INST]\n", "hello there, a longer prompt than the others", "[INST] x [/INST]\n\nq"]
STRATEGIES = [("oracle", {}), ("meteora", {"top_k": 2}), ("meteora", {"top_k": 1, "temperature": 15.0}),
              ("dlp", {"hidden": 32, "top_p": 0.9, "fusion": "renorm"}),
              ("dlp_segments", {"hidden": 32, "top_p": 0.9}), ("lora_b", {"adapter": "b"}), ("merge", {}),
              ("base", {}),
              # the routed span and prefix-window features (models/routing/features.py): padding-side independent
              ("dlp", {"hidden": 32, "top_p": 0.9, "prefix_windows": [2, 4], "span_tokens": 6}),
              ("dlp_segments", {"hidden": 32, "top_p": 0.9, "prefix_windows": [1, 3], "span_tokens": 5})]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return save_test_assets(tmp_path_factory.mktemp("routing"))


def _mm(assets, router="oracle", names=("a", "b", "c"), **kw):
    base, dirs = assets
    model, tok = load_base_model(base)
    return MultiLoRAModel.from_adapters(model, {n: str(dirs[n]) for n in names}, router=router, tokenizer=tok, **kw)


def _randomize(router, seed=0, std=0.5):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in router.parameters():
            p.normal_(0, std)


@pytest.mark.parametrize("name,kw", STRATEGIES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(STRATEGIES)])
def test_batched_generate_equals_one_by_one(assets, name, kw):
    mm = _mm(assets)
    mm.set_router(name, **kw)
    _randomize(mm.router, std=2.0)  # trained-looking routers: different choices per prompt / token
    tok, tasks = mm.tokenizer, ["c", "a", "b"]
    gen = {"max_new_tokens": 4, "do_sample": False, "output_scores": True, "return_dict_in_generate": True}
    batch = tok(PROMPTS, return_tensors="pt", padding=True)
    out = mm.generate(**batch, task_ids=tasks, **gen)
    routes = mm.last_route()
    for i, p in enumerate(PROMPTS):
        one = tok([p], return_tensors="pt")
        ref = mm.generate(**one, task_ids=[tasks[i]], **gen)
        assert out.sequences[i, -4:].tolist() == ref.sequences[0, -4:].tolist()
        for s_b, s_1 in zip(out.scores, ref.scores):
            torch.testing.assert_close(s_b[i], s_1[0], atol=1e-4, rtol=0)
        if routes is not None:  # sentence routing: same decision alone as in the padded batch
            k = mm.last_route()[0].shape[1]
            assert routes[0][i, :k].tolist() == mm.last_route()[0][0].tolist()


def test_hf_generate_directly_and_beams(assets):
    mm = _mm(assets, router="oracle")
    tok = mm.tokenizer
    batch = tok(PROMPTS[:2], return_tensors="pt", padding=True)
    mm.set_routing(task_ids=["b", "c"])
    direct = mm.model.generate(**batch, max_new_tokens=5, do_sample=False)
    assert torch.equal(direct, mm.generate(**batch, max_new_tokens=5, do_sample=False))
    beams = mm.generate(**batch, max_new_tokens=4, num_beams=2, num_return_sequences=2, do_sample=False)
    assert beams.shape[0] == 4  # per-sequence routes were repeated for every beam
    mm.set_routing(task_ids=None)
    with pytest.raises(ValueError, match="router 'oracle' needs the task of every sequence"):
        mm.generate(**batch, max_new_tokens=2)


def test_dlp_route_used_for_every_decode_step(assets):
    """The route is decided at prefill and kept: decode steps see the same (ids, weights) object."""
    mm = _mm(assets, router="dlp", hidden=32, top_p=0.95)
    _randomize(mm.router, std=2.0)
    batch = mm.tokenizer(PROMPTS, return_tensors="pt", padding=True)
    seen = []
    orig = mm.router.route

    def spy(name, x, state=None):  # the wrapped layer hands its projection state too
        r = orig(name, x, state)
        seen.append((x.shape[1], r.ids.clone(), r.seq_ids.numel()))
        return r

    mm.router.route = spy
    mm.generate(**batch, max_new_tokens=3, do_sample=False)
    decode = [s for s in seen if s[0] == 1]
    assert decode and all(torch.equal(s[1], seen[0][1]) and s[2] == len(PROMPTS) for s in decode)


def test_segment_split_and_segment_routing(assets):
    pieces = ["[INST]", " a", " [/INST]", "\n", "\n", "[", "INST", "]", " b", "\n\n", "tail"]
    assert segment_tokens(pieces) == [0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 2]
    mm = _mm(assets, router="dlp_segments", hidden=32, top_p=1e-6)
    _randomize(mm.router, std=2.0)
    tok = mm.tokenizer
    text = "[INST] count the apples [/INST]\n\n[INST] translate: hallo welt [/INST]"
    batch = tok([text], return_tensors="pt")
    with torch.no_grad():
        mm(**batch)
        tok_ids = mm.router._tok[0][0, :, 0]
        parts = ["[INST] count the apples [/INST]\n\n", "[INST] translate: hallo welt [/INST]"]
        want = [int(mm.router.logits(**tok([p], return_tensors="pt")).argmax()) for p in parts]
    n0 = len(tok(parts[0])["input_ids"])
    assert tok_ids[:n0].unique().tolist() == [want[0]] and tok_ids[n0:].unique().tolist() == [want[1]]
    # teacher forcing: route on the first block only; the rest (the "answer") follows the whole route
    route_mask = torch.zeros_like(batch["attention_mask"])
    route_mask[:, :n0] = 1
    with torch.no_grad():
        mm(**batch, route_mask=route_mask)
    whole = mm.last_route()[0][0, 0].item()
    assert whole == want[0]  # the whole route read only the routed tokens
    assert mm.router._tok[0][0, n0:, 0].unique().tolist() == [whole]


@pytest.mark.parametrize("strategy,kw", [("meteora", {"top_k": 2, "temperature": 15.0}),
                                         ("dlp", {"hidden": 48, "top_p": 0.7, "fusion": "renorm"}),
                                         ("dlp", {"hidden": 48, "prefix_windows": [2, 8], "span_tokens": 7})])
def test_router_checkpoint_round_trip(assets, tmp_path, strategy, kw):
    mm = _mm(assets, router=strategy, **kw)
    _randomize(mm.router, seed=3)
    batch = mm.tokenizer(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        want = mm(**batch).logits
    mm.save_router(tmp_path / "r")
    meta = json.loads((tmp_path / "r" / "router.json").read_text())
    assert meta["strategy"] == strategy and meta["adapter_names"] == ["a", "b", "c"] and meta["config"].items() >= kw.items()
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == ["router.json", "router.safetensors"]  # no temp left
    # a fresh model whose bank holds the same adapters in another order: rows are permuted back
    other = _mm(assets, router="base", names=("c", "a", "b"))
    other.load_router(tmp_path / "r")
    assert other.strategy == strategy
    with torch.no_grad():
        torch.testing.assert_close(other(**batch).logits, want, atol=1e-5, rtol=0)
    if strategy == "meteora":
        other.load_router(tmp_path / "r", top_k=1)  # inference knobs can be overridden
        assert other.router.top_k == 1 and other.router.temperature == 15.0
        with pytest.raises(RouterCheckpointError, match="strategy: saved as 'meteora', cannot load as 'dlp'"):
            other.load_router(tmp_path / "r", strategy="dlp")
    else:  # a trained dlp router applied per segment
        seg = other.load_router(tmp_path / "r", strategy="dlp_segments")
        assert seg.name == "dlp_segments" and torch.equal(seg.mlp[-1].weight, mm.router.mlp[-1].weight[[2, 0, 1]])


def test_router_checkpoint_rejects_mismatches(assets, tmp_path):
    mm = _mm(assets, router="meteora")
    mm.save_router(tmp_path / "r")
    two = _mm(assets, router="base", names=("a", "b"))
    with pytest.raises(RouterCheckpointError, match=r"adapter_names: trained for \['a', 'b', 'c'\].*not in bank: \['c'\]"):
        two.load_router(tmp_path / "r")
    qv = _mm(assets, router="base", targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                              "down_proj", "lm_head"])
    with pytest.raises(RouterCheckpointError, match="tensors: missing .*lm_head"):
        qv.load_router(tmp_path / "r")
    with pytest.raises(RouterCheckpointError, match="router.json / router.safetensors missing"):
        mm.load_router(tmp_path / "nothing")
    (tmp_path / "r" / "router.json").write_text("{}")
    with pytest.raises(RouterCheckpointError, match="format: not a loramux-router checkpoint"):
        mm.load_router(tmp_path / "r")


def test_option_validation(assets):
    mm = _mm(assets)
    cases = [
        (("dlp",), {"top_p": 0.0}, r"dlp top_p=0.0 must be in \(0, 1\]"),
        (("dlp",), {"fusion": "max"}, "dlp fusion='max' is not known"),
        (("meteora",), {"top_k": 4}, r"meteora top_k=4 must be an integer in \[1, number of adapters = 3\]"),
        (("meteora",), {"temperature": 0}, "meteora temperature=0 must be > 0"),
        (("merge",), {"mode": "ties"}, "merge mode='ties' is not known"),
        (("lora_b",), {}, r"router 'lora_b' needs adapter=<name>"),
        (("moe",), {}, "router='moe' is not known"),
        (("oracle",), {"top_k": 2}, "router='oracle': .*unexpected keyword argument 'top_k'"),
    ]
    for args, kw, msg in cases:
        with pytest.raises(ValueError, match=msg):
            mm.set_router(*args, **kw)
    with pytest.raises(KeyError, match="'zz' is not in the bank"):
        mm.set_router("lora_b", adapter="zz")
    with pytest.raises(ValueError, match=r"task ids \[5\] are out of range for 3 adapters"):
        mm.set_routing(task_ids=[5])
    with pytest.raises(ValueError, match="trainable='gates' needs router='meteora'"):
        mm.set_trainable("gates")
    with pytest.raises(ValueError, match="router 'oracle' has no parameters to train"):
        mm.set_trainable("router")
    with pytest.raises(ValueError, match="trainable='all' is not known"):
        mm.set_trainable("all")


@torch.no_grad()
def test_one_task_id_is_broadcast_to_the_batch_and_other_lengths_refused(assets):
    """task_ids: one per sequence, or one (a name, a one-element list or tensor) for the whole batch; every other
    length is one clear error, per call or persistent (a 2-element list for 4 sequences used to repeat each)."""
    mm = _mm(assets, router="oracle")
    batch = mm.tokenizer(PROMPTS[:2] * 2, return_tensors="pt", padding=True)
    want = mm(**batch, task_ids=["b"] * 4).logits
    for one in ("b", ["b"], [1], torch.tensor([1])):
        torch.testing.assert_close(mm(**batch, task_ids=one).logits, want, rtol=0, atol=0)
    mm.set_routing(task_ids="b")
    torch.testing.assert_close(mm(**batch).logits, want, rtol=0, atol=0)
    for bad in (["a", "b"], ["a", "b", "c"], [], ["a"] * 5):
        with pytest.raises(ValueError, match=rf"^{len(bad)} task ids for a batch of 4 sequences; give one per") as e:
            mm(**batch, task_ids=bad)
        assert "\n" not in str(e.value)
        with pytest.raises(ValueError, match=rf"^{len(bad)} task ids for a batch of 4"):
            mm.generate(**batch, task_ids=bad, max_new_tokens=1)
    mm.set_routing(task_ids=["a", "b"])  # persistent: checked against the batch of each call
    with pytest.raises(ValueError, match="2 task ids for a batch of 4 sequences"):
        mm(**batch)
    mm.set_router("dlp", hidden=16)
    assert mm.router_loss(batch["input_ids"], batch["attention_mask"], "c").ndim == 0
    with pytest.raises(ValueError, match="3 task ids for a batch of 4 sequences"):
        mm.router_loss(batch["input_ids"], batch["attention_mask"], ["a", "b", "c"])


def test_dlp_wide_nucleus_folded_per_sequence_is_the_same_model(assets, monkeypatch):
    """A near-uniform DLP router keeps all 3 adapters: its prefill takes the folded per-sequence form
    (kernels.sequence_concat) in every wrapped projection; logits and greedy tokens equal the unfolded op's."""
    from kernels import sequence_concat

    mm = _mm(assets, router="dlp", hidden=32, top_p=0.99)
    _randomize(mm.router, std=1e-3)
    batch = mm.tokenizer(PROMPTS, return_tensors="pt", padding=True)
    folds = []
    real = sequence_concat.multi_lora_per_sequence
    monkeypatch.setattr(sequence_concat, "multi_lora_per_sequence", lambda *a: folds.append(1) or real(*a))
    logits, tokens = {}, {}
    for min_k in (1, 10**9):  # folded at every prefill, or never (a huge SEQ_CONCAT_MIN_LEN turns it off)
        monkeypatch.setattr(sequence_concat, "SEQ_CONCAT_MIN_K", min_k)
        monkeypatch.setattr(sequence_concat, "SEQ_CONCAT_MIN_LEN", 2 if min_k == 1 else 10**9)
        folds.clear()
        with torch.no_grad():
            logits[min_k] = mm(**batch).logits
        tokens[min_k] = mm.generate(**batch, max_new_tokens=4, do_sample=False)
        assert bool(folds) == (min_k == 1)
    assert mm.last_route()[0].shape[1] == 3 and (mm.last_route()[0] >= 0).all()
    torch.testing.assert_close(logits[1], logits[10**9], atol=1e-5, rtol=1e-5)
    assert torch.equal(tokens[1], tokens[10**9])


def test_oracle_over_a_one_adapter_bank_is_uniform_wherever_its_task_ids_live(assets):
    """A one-adapter bank routes every row to adapter 0, so the oracle's route is uniform (two plain GEMMs a
    projection, ``kernels.uniform``) without reading its task ids, also where they live on the device (a captured
    CUDA-graph training step; the meta device stands in for it here: nothing there can be read). With more
    adapters, ids that cannot be read leave the route general."""
    mm = _mm(assets, router="oracle", names=("a",))
    router = mm.ctx.router
    mm.ctx.task_ids = torch.zeros(4, dtype=torch.long, device="meta")
    assert router.uniform_adapter() == 0
    many = _mm(assets, router="oracle")
    many.ctx.task_ids = torch.zeros(4, dtype=torch.long, device="meta")
    assert many.ctx.router.uniform_adapter() is None
    many.ctx.task_ids = torch.tensor([1, 1, 1, 1])
    assert many.ctx.router.uniform_adapter() == 1
