"""models.projection_groups: q / k / v and gate / up run as one packed projection at inference, with the outputs of
the ungrouped model.

The test adapters differ in rank (8, 4), scale (rsLoRA) and targets (only "a" touches k_proj, gate_proj, up_proj),
so the packed adapter's blocks have different ranks, scales and empty blocks. Every router is compared: one adapter
for every row rides its shrink in the base GEMM; any other route at decode (the mixed oracle, dlp, MeteoRA's gates)
runs the GEMM over every adapter's shrink rows (and the gates) and one routed expand (``kernels.expand_shrunk``);
merge's per-projection LoRA runs the members alone.
"""

import pytest
import torch
from test_graph_generate import Record

from models import MultiLoRAModel, load_base_model
from models.graph_generate import graph_generate
from models.projection_groups import PACK_ALIGN
from models.tiny import save_test_assets

PROMPTS = ["hello world, this is a test", "[INST] what is 2+2? [/INST]\n", "abc"]

ROUTERS = [
    ("oracle", {}, ["a", "b", "c"]),
    ("oracle", {}, ["a", "a", "a"]),          # one adapter for every row: the packed adapter alone
    ("oracle", {}, ["c", "a", "c"]),          # two of the three adapters
    ("lora_b", {"adapter": "c"}, None),
    ("dlp", {"hidden": 32, "layers": 1}, None),
    ("base", {}, None),
    ("meteora", {"top_k": 2}, None),          # per-projection routes: the packed base only
    ("merge", {}, None),
]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return save_test_assets(tmp_path_factory.mktemp("projection_groups"))


def _mm(assets, router, kw, grouped: bool):
    base, dirs = assets
    model, tok = load_base_model(base)
    torch.manual_seed(0)  # the same fresh gates / router weights for both models
    return MultiLoRAModel.from_adapters(model, {n: str(d) for n, d in dirs.items()}, router=router, tokenizer=tok,
                                        group_projections=grouped, **kw).eval()


def _count_base_calls(mm):
    calls = {}
    for name, m in mm.model.named_modules():
        if hasattr(m, "base_layer"):
            m.base_layer.register_forward_hook(lambda mod, a, o, n=name: calls.__setitem__(n, calls.get(n, 0) + 1))
    return calls


def _same_decode(plain, grouped, batch, extra):
    """6 greedy tokens of both models (the graph decode's loop, uncaptured): the same tokens, and the decode steps'
    logits too."""
    kw_gen = {"max_new_tokens": 6, "pad_token_id": plain.tokenizer.pad_token_id, "eos_token_id": None, **extra}
    want_scores, got_scores = Record(), Record()
    want = graph_generate(plain, batch["input_ids"], batch["attention_mask"], capture=False,
                          logits_processor=[want_scores], **kw_gen)
    got = graph_generate(grouped, batch["input_ids"], batch["attention_mask"], capture=False,
                         logits_processor=[got_scores], **kw_gen)
    assert torch.equal(got, want)
    for a, b in zip(got_scores.scores, want_scores.scores, strict=True):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("router, kw, task_ids", ROUTERS)
def test_grouped_logits_and_tokens_equal_the_ungrouped_model(assets, router, kw, task_ids):
    plain, grouped = _mm(assets, router, kw, False), _mm(assets, router, kw, True)
    assert len(grouped._groups) == 8  # 2 layers x (q/k/v, gate/up, o, down)
    tok = plain.tokenizer
    batch = tok(PROMPTS, return_tensors="pt", padding=True)
    extra = {"task_ids": task_ids} if task_ids is not None else {}
    with torch.no_grad():
        want = plain(**batch, **extra).logits
        got = grouped(**batch, **extra).logits
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
    one = kw.get("adapter") or (task_ids[0] if task_ids is not None and len(set(task_ids)) == 1 else None)
    # one adapter for every row: its shrink rode in the base GEMM (the packed weight's last rows) wherever it has a
    # rank; adapter "c" (lora_b's) touches only q, v and down
    for g in grouped._groups:
        touched = one is not None and any(m.slots.host_ranks[grouped.bank.index(one)] for m in g.members)
        assert (g._shrink is not None) == touched
    assert one is None or sum(g._shrink is not None for g in grouped._groups) == {"a": 8, "c": 4}[one]

    calls = _count_base_calls(grouped)
    _same_decode(plain, grouped, batch, extra)
    # a member's own base layer runs when its group does not: every step for merge's per-projection LoRA; the
    # prefill of a route that is not one adapter for every row (dlp, the mixed oracle, MeteoRA's gates: their
    # decode steps run the group's GEMM and routed expand); never else
    per_member = 6 if router == "merge" else 1 if router in ("dlp", "meteora") or (
        task_ids is not None and one is None) else 0
    assert len(calls) == (14 if per_member else 0) and all(c == per_member for c in calls.values())


@pytest.fixture(scope="module")
def qv_assets(assets, tmp_path_factory):
    """DLP-LoRA-style adapters on the same tiny model: q and v only (c: q only), mixed ranks, one rsLoRA."""
    from models.tiny import save_random_peft_adapter

    base, root = assets[0], tmp_path_factory.mktemp("qv_adapters")
    specs = {"a": {"r": 8}, "b": {"r": 4, "lora_alpha": 8, "use_rslora": True},
             "c": {"r": 8, "lora_alpha": 32, "targets": ("q_proj",)}}
    return base, {n: save_random_peft_adapter(base, root / n, seed=i + 7, **spec) for i, (n, spec) in
                  enumerate(specs.items())}


@pytest.mark.parametrize("router, kw, task_ids", ROUTERS)
def test_q_v_adapters_group_with_a_plain_k(qv_assets, router, kw, task_ids):
    """DLP-LoRA's adapters touch q and v only: k_proj stays a plain nn.Linear, yet the three read the same x. Grouped,
    k stands in as a PlainMember whose share of the packed GEMM it takes (its own nn.Linear does not run at a decode
    step the group computes), o / gate / up / down (no adapter) stay as they are, and logits and decoded tokens equal
    the ungrouped model's; ungrouping puts the plain k back with its own weight and the same state dict."""
    from models.plain_member import PlainMember

    base, dirs = qv_assets

    def build(grouped):
        model, tok = load_base_model(base)
        torch.manual_seed(0)
        return MultiLoRAModel.from_adapters(model, {n: str(d) for n, d in dirs.items()}, router=router,
                                            tokenizer=tok, group_projections=grouped, **kw).eval()

    plain, grouped = build(False), build(True)
    keys = set(plain.model.state_dict())
    blocks = [m for m in grouped.model.modules() if hasattr(m, "k_proj")]
    assert len(grouped._groups) == 2 and all(isinstance(b.k_proj, PlainMember) for b in blocks)
    assert all(type(b.o_proj) is torch.nn.Linear for b in blocks)  # a group needs an adapter in it
    k_calls = []
    for b in blocks:
        b.k_proj.base_layer.register_forward_hook(lambda *a: k_calls.append(1))
    tok = plain.tokenizer
    batch = tok(PROMPTS, return_tensors="pt", padding=True)
    extra = {"task_ids": task_ids} if task_ids is not None else {}
    with torch.no_grad():
        torch.testing.assert_close(grouped(**batch, **extra).logits, plain(**batch, **extra).logits,
                                   atol=2e-5, rtol=1e-5)
    k_calls.clear()
    _same_decode(plain, grouped, batch, extra)
    for g in grouped._groups:  # the bank rows (laid out by a routed decode) hold q's and v's adapters, none for k
        rows = g.out + g.extra + 2 * g.L * g.R + g.gate_rows
        assert g.L == 0 or g.weight.shape[0] == -(-rows // PACK_ALIGN) * PACK_ALIGN
    # a routed decode in the group (MeteoRA: q's and v's gates packed, k's columns routed by q's gate, B zero)
    routed = router in ("dlp", "meteora") or (router == "oracle" and len(set(task_ids)) > 1)
    assert any(g.L for g in grouped._groups) == routed
    assert all(g.gate_rows == (2 * g.L if router == "meteora" else 0) for g in grouped._groups)  # none for k
    assert grouped.decodes_grouped() == (router != "merge")
    # k's own layer runs where its group does not: the prefill of a route that is not one adapter for every row,
    # every step of merge's per-projection LoRA
    uniform = kw.get("adapter") or (task_ids is not None and len(set(task_ids)) == 1)
    per_block = 6 if router == "merge" else 0 if uniform or router == "base" else 1
    assert len(k_calls) == per_block * len(blocks)
    grouped.group_projections(False)
    assert all(type(b.k_proj) is torch.nn.Linear for b in blocks) and set(grouped.model.state_dict()) == keys
    assert all(b.k_proj.weight.is_contiguous() and b.k_proj.weight.storage_offset() == 0 for b in blocks)


def test_training_runs_the_members_alone_with_the_bank_gradients(assets):
    """With gradients enabled nothing is grouped: the adapters' gradients are the ungrouped model's."""
    plain, grouped = _mm(assets, "oracle", {}, False), _mm(assets, "oracle", {}, True)
    tok = plain.tokenizer
    batch = tok(PROMPTS, return_tensors="pt", padding=True)
    grads = []
    for mm in (plain, grouped):
        mm.set_trainable("adapters")
        loss = mm(**batch, labels=batch["input_ids"], task_ids=["a", "b", "c"]).loss
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in mm.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], atol=1e-6, rtol=1e-5)


def test_nan_in_what_is_not_routed_never_reaches_the_grouped_output(assets):
    """Poison adapter "b" (NaN in its live and padding columns) and the rank padding of "a" and "c", and route only
    "a" and "c": the grouped output equals the clean model's (the packed bank zeroes padding with a select)."""
    clean, poisoned = _mm(assets, "oracle", {}, True), _mm(assets, "oracle", {}, True)
    b = poisoned.bank.index("b")
    with torch.no_grad():
        for slots in poisoned.bank.slots.values():
            slots.A[b] = float("nan")
            slots.B[b] = float("nan")
            for a in (poisoned.bank.index("a"), poisoned.bank.index("c")):
                r = slots.host_ranks[a]
                assert r < slots.A.shape[2]  # there is padding to poison
                slots.A[a, :, r:] = float("nan")
                slots.B[a, r:] = float("nan")
    poisoned.bank.version += 1
    tok = clean.tokenizer
    batch = tok(PROMPTS, return_tensors="pt", padding=True)
    kw = {"max_new_tokens": 4, "pad_token_id": tok.pad_token_id, "eos_token_id": None, "task_ids": ["a", "c", "a"]}
    scores = []
    for mm in (clean, poisoned):  # the prefill, then decode steps on the packed bank
        scores.append(Record())
        graph_generate(mm, batch["input_ids"], batch["attention_mask"], capture=False, logits_processor=[scores[-1]],
                       **kw)
    for want, got in zip(*(r.scores for r in scores), strict=True):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


def test_a_member_called_on_another_input_computes_itself(assets):
    """The leader keeps the others' outputs for its own input only: k_proj called on another tensor (not how HF
    calls it, but a caller may) computes its own projection of that tensor."""
    plain, grouped = _mm(assets, "oracle", {}, False), _mm(assets, "oracle", {}, True)
    for mm in (plain, grouped):
        mm.set_routing(task_ids=["a"])
        mm.router.begin_forward(torch.zeros(1, 5, dtype=torch.long), None, None, True)
    x1, x2 = torch.randn(1, 5, 64), torch.randn(1, 5, 64)
    attn = [mm.model.model.layers[0].self_attn for mm in (plain, grouped)]
    with torch.no_grad():
        grouped_q = attn[1].q_proj(x1)
        torch.testing.assert_close(grouped_q, attn[0].q_proj(x1), atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(attn[1].k_proj(x2), attn[0].k_proj(x2), atol=2e-5, rtol=1e-5)


def test_a_bank_change_repacks_and_a_replaced_weight_breaks_the_group(assets):
    """A hot swap changes the packed adapter; a base weight replaced after grouping (a cast) runs its group's
    members alone, still correct; ungrouping gives every member its own contiguous weight (savable)."""
    _, dirs = assets
    plain, grouped = _mm(assets, "oracle", {}, False), _mm(assets, "oracle", {}, True)
    tok = plain.tokenizer
    batch = tok(PROMPTS, return_tensors="pt", padding=True)
    ids = ["a", "a", "a"]
    with torch.no_grad():
        grouped(**batch, task_ids=ids)
        for mm in (plain, grouped):
            mm.replace_adapter("a", dirs["c"])
        torch.testing.assert_close(grouped(**batch, task_ids=ids).logits, plain(**batch, task_ids=ids).logits,
                                   atol=2e-5, rtol=1e-5)
        q = grouped.model.model.layers[0].self_attn.q_proj.base_layer
        q.weight = torch.nn.Parameter(q.weight.detach().clone(), requires_grad=False)
        g = grouped.model.model.layers[0].self_attn.q_proj.group
        assert not g.intact()
        torch.testing.assert_close(grouped(**batch, task_ids=ids).logits, plain(**batch, task_ids=ids).logits,
                                   atol=2e-5, rtol=1e-5)
    for mm in (plain, grouped):  # model.to(dtype) swaps every parameter's data: the groups run their members alone
        mm.to(torch.float64)
    assert not any(g.intact() for g in grouped._groups)
    with torch.no_grad():
        torch.testing.assert_close(grouped(**batch, task_ids=ids).logits, plain(**batch, task_ids=ids).logits)
    model = grouped.unwrap()
    k = model.model.layers[0].self_attn.k_proj.weight
    assert k.is_contiguous() and k.untyped_storage().nbytes() == k.numel() * k.element_size()


@pytest.mark.parametrize("router, kw, task_ids", [("oracle", {}, ["a", "b", "c"]), ("meteora", {"top_k": 2}, None)])
def test_the_triton_kernels_route_and_expand_the_group(assets, monkeypatch, router, kw, task_ids):
    """The routed expand over the group's shrink rows through the Triton kernels (the interpreter here, so only the
    grouped model runs them; the ungrouped one on the torch path, which other tests hold to the kernels): the mixed
    oracle's given route and MeteoRA's top-k of the gate logits the GEMM computed; the prefill and a decode step
    give the ungrouped model's tokens and step logits."""
    plain, grouped = _mm(assets, router, kw, False), _mm(assets, router, kw, True)
    tok = plain.tokenizer
    batch = tok(["[INST] hi", "a b c", "xyz"], return_tensors="pt", padding=True)
    kw_gen = {"max_new_tokens": 2, "pad_token_id": tok.pad_token_id, "eos_token_id": None,
              **({"task_ids": task_ids} if task_ids else {})}
    want_scores, got_scores = Record(), Record()
    monkeypatch.setenv("LORAMUX_KERNEL_BACKEND", "torch")
    want = graph_generate(plain, batch["input_ids"], batch["attention_mask"], capture=False,
                          logits_processor=[want_scores], **kw_gen)
    monkeypatch.setenv("LORAMUX_KERNEL_BACKEND", "triton")
    got = graph_generate(grouped, batch["input_ids"], batch["attention_mask"], capture=False,
                         logits_processor=[got_scores], **kw_gen)
    assert torch.equal(got, want)
    for a, b in zip(got_scores.scores, want_scores.scores, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("router, kw, task_ids", [("oracle", {}, ["a", "a", "a"]), ("lora_b", {"adapter": "c"}, None)])
def test_one_launch_decode_equals_the_two_launch_group(assets, monkeypatch, router, kw, task_ids):
    """``group_projections(one_launch=...)``: a uniform route's decode steps go through ``kernels.gemv_lora`` (the
    Triton kernel, interpreted here) once per touched group and token step, the prefill keeps the GEMM + addmm, and
    the tokens and step logits are the two-launch group's."""
    import kernels

    two = _mm(assets, router, kw, True)
    one = _mm(assets, router, kw, True)
    assert one.group_projections(one_launch="triton") == 8
    calls = []
    real = kernels.gemv_lora
    monkeypatch.setattr(kernels, "gemv_lora", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    tok = two.tokenizer
    batch = tok(["[INST] hi", "a b c", "xyz"], return_tensors="pt", padding=True)
    kw_gen = {"max_new_tokens": 3, "pad_token_id": tok.pad_token_id, "eos_token_id": None,
              **({"task_ids": task_ids} if task_ids else {})}  # fmt: skip
    want_scores, got_scores = Record(), Record()
    want = graph_generate(two, batch["input_ids"], batch["attention_mask"], capture=False,
                          logits_processor=[want_scores], **kw_gen)  # fmt: skip
    assert not calls  # the two-launch group never calls it
    got = graph_generate(one, batch["input_ids"], batch["attention_mask"], capture=False,
                         logits_processor=[got_scores], **kw_gen)  # fmt: skip
    assert torch.equal(got, want)
    for a, b in zip(got_scores.scores, want_scores.scores, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    touched = {"a": 8, "c": 4}[task_ids[0] if task_ids else kw["adapter"]]  # groups the adapter has a rank in
    assert len(calls) == touched * 2 and all(s[0] == 3 for s in calls)  # 2 decode steps x 3 rows; no prefill


def test_group_projections_setting_groups_on_cuda_only_when_auto():
    """generation.group_projections / bench.group_projections = auto groups a model on a CUDA device (where the e2e
    table timed it faster) and leaves a CPU model alone; true / false are obeyed."""
    from pipeline.runtime.multilora import groups_wanted

    cpu = torch.nn.Linear(2, 2)
    assert groups_wanted("auto", cpu) is False and groups_wanted(True, cpu) is True
    assert groups_wanted(False, cpu) is False


@pytest.mark.parametrize("router, kw", [("meteora", {"top_k": 2}), ("dlp", {"hidden": 32, "layers": 1})])
def test_new_gates_or_adapters_rewrite_the_group_rows(assets, router, kw):
    """The rows a decode step reads (every adapter's A^T, MeteoRA's gates) follow the model: gate weights changed
    in place, and an adapter added (a new layout: more rows), give the ungrouped model's decode logits."""
    _, dirs = assets
    plain, grouped = _mm(assets, router, kw, False), _mm(assets, router, kw, True)
    tok = plain.tokenizer
    batch = tok(PROMPTS, return_tensors="pt", padding=True)
    kw_gen = {"max_new_tokens": 3, "pad_token_id": tok.pad_token_id, "eos_token_id": None}

    def decode_scores(mm):
        rec = Record()
        graph_generate(mm, batch["input_ids"], batch["attention_mask"], capture=False, logits_processor=[rec],
                       **kw_gen)
        return rec.scores

    def same():
        for a, b in zip(decode_scores(grouped), decode_scores(plain), strict=True):
            torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)

    same()
    rows = [g.weight.shape[0] for g in grouped._groups]
    with torch.no_grad():
        for mm in (plain, grouped):
            torch.manual_seed(1)
            for p in mm.router.parameters():
                p.mul_(-1.5).add_(0.1 * torch.randn_like(p))
    same()
    for mm in (plain, grouped):
        mm.add_adapter("d", dirs["a"])
    grouped.router.load_state_dict(plain.router.state_dict())  # the new adapter's fresh router rows: the same
    same()
    assert all(g.L == 4 and g.weight.shape[0] >= r for g, r in zip(grouped._groups, rows, strict=True))  # re-laid out
    for g in grouped._groups:  # rows rounded up with zero rows after the gates (an aligned GEMM output row)
        used = g.out + g.extra + len(g.members) * g.L * g.R + g.gate_rows
        assert g.weight.shape[0] % PACK_ALIGN == 0 and g.weight.shape[0] - used < PACK_ALIGN
        assert g.gate_rows in (0, len(g.members) * 4) and (g.weight[used:] == 0).all()  # gates: MeteoRA only


def test_a_router_that_alternates_with_meteora_packs_once(assets):
    """One model whose router switches between MeteoRA's gates and DLP (the e2e benchmark's shared model, or a user
    comparing strategies): the layout with gate rows serves both, so the packed weights are laid out once, and
    every decode equals the ungrouped model's under the same router."""
    plain, grouped = _mm(assets, "meteora", {"top_k": 2}, False), _mm(assets, "meteora", {"top_k": 2}, True)
    tok = plain.tokenizer
    batch = tok(PROMPTS, return_tensors="pt", padding=True)
    kw_gen = {"max_new_tokens": 3, "pad_token_id": tok.pad_token_id, "eos_token_id": None}
    routers = {}
    for mm in (plain, grouped):
        torch.manual_seed(0)
        routers[id(mm)] = {"meteora": mm.router, "dlp": mm.build_router("dlp", hidden=32, layers=1)}

    def decode_scores(mm, name):
        mm.set_router(routers[id(mm)][name])
        rec = Record()
        graph_generate(mm, batch["input_ids"], batch["attention_mask"], capture=False, logits_processor=[rec],
                       **kw_gen)
        return rec.scores

    weights = None
    for name in ("meteora", "dlp", "meteora", "dlp"):
        for a, b in zip(decode_scores(grouped, name), decode_scores(plain, name), strict=True):
            torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)
        now = [g.weight for g in grouped._groups]
        assert all(g.gate_rows > 0 for g in grouped._groups)
        assert weights is None or all(a is b for a, b in zip(now, weights, strict=True)), name  # not re-packed
        weights = now


def test_shared_routes_over_other_adapters_each_call_keep_one_layout(assets):
    """Each generate call routes its rows to other adapters (a DLP nucleus per prompt, the oracle over a mixed
    batch): the tokens are the ungrouped model's every time, and the bank rows, laid out at the first call, are never
    rewritten for a later route (a per-route layout, rewritten each call, was slower on the H200)."""
    plain, grouped = _mm(assets, "oracle", {}, False), _mm(assets, "oracle", {}, True)
    tok = plain.tokenizer
    batch = tok(PROMPTS, return_tensors="pt", padding=True)
    kw_gen = {"max_new_tokens": 3, "pad_token_id": tok.pad_token_id, "eos_token_id": None}
    layout = None
    for task_ids in (["c", "a", "c"], ["a", "b", "c"], ["b", "a", "b"], ["c", "a", "c"]):
        want = graph_generate(plain, batch["input_ids"], batch["attention_mask"], capture=False, task_ids=task_ids,
                              **kw_gen)
        got = graph_generate(grouped, batch["input_ids"], batch["attention_mask"], capture=False, task_ids=task_ids,
                             **kw_gen)
        assert torch.equal(got, want), task_ids
        now = [(g.weight, g.weight._version, g._rows) for g in grouped._groups]
        assert all(r == grouped.bank.version for _, _, r in now)
        assert layout is None or all(a[0] is b[0] and a[1] == b[1] for a, b in zip(now, layout, strict=True)), task_ids
        layout = now
