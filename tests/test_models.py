"""Every routing strategy against peft itself, on a tiny random LLaMA and real peft adapters (fp32, CPU)."""

import pytest
import torch
from peft import PeftModel

from models import MultiLoRAModel, load_base_model, route_top_p
from models.multilora_linear import MultiLoRALinear
from models.tiny import save_test_assets

PROMPTS = ["hello world, this is a test", "[INST] what is 2+2? [/INST]\n", "abc"]
ATOL = 1e-5


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return save_test_assets(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def peft_ref(assets):
    """One PeftModel holding all three adapters; ``set_adapter`` picks one."""
    base, dirs = assets
    pm = PeftModel.from_pretrained(load_base_model(base)[0], str(dirs["a"]), adapter_name="a")
    for n in ("b", "c"):
        pm.load_adapter(str(dirs[n]), adapter_name=n)
    return pm.eval()


@pytest.fixture()
def mm(assets):
    base, dirs = assets
    model, tok = load_base_model(base)
    return MultiLoRAModel.from_adapters(model, {n: str(d) for n, d in dirs.items()}, router="oracle", tokenizer=tok)


def _batch(mm):
    return mm.tokenizer(PROMPTS, return_tensors="pt", padding=True)


@torch.no_grad()
def _peft_logits(pm, batch, adapter):
    pm.set_adapter(adapter)
    return pm(**batch).logits


def test_wraps_union_of_adapter_targets(mm):
    wrapped = {n.rsplit(".", 1)[-1] for n in mm.bank.modules_wrapped}
    assert wrapped == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert sum(isinstance(m, MultiLoRALinear) for m in mm.model.modules()) == 14  # 7 projections x 2 layers
    A, _B, scales, ranks = mm.bank.tensors("model.layers.0.self_attn.q_proj")
    assert A.shape[0] == 3 and A.shape[2] % 16 == 0 and ranks.tolist() == [8, 4, 8]
    assert scales.tolist() == pytest.approx([16 / 8, 8 / 4 ** 0.5, 32 / 8])  # b uses rsLoRA: alpha / sqrt(r)
    assert mm.bank.tensors("model.layers.0.self_attn.k_proj")[3].tolist() == [8, 0, 0]  # b, c leave k alone


@torch.no_grad()
def test_oracle_equals_peft_single_adapter(mm, peft_ref):
    batch = _batch(mm)
    mm.set_router("base")
    plain = mm(**batch).logits
    mm.set_router("oracle")
    for name in ("a", "b", "c"):
        ours = mm(**batch, task_ids=[name] * len(PROMPTS)).logits
        ref = _peft_logits(peft_ref, batch, name)
        assert (ref - plain).abs().max() > 1e-2, "adapter delta must be visible for the test to mean anything"
        torch.testing.assert_close(ours, ref, atol=ATOL, rtol=0)
    # mixed routes in one batch: each row equals its own adapter
    mixed = mm(**batch, task_ids=["c", "a", "b"]).logits
    for i, name in enumerate(["c", "a", "b"]):
        torch.testing.assert_close(mixed[i], _peft_logits(peft_ref, batch, name)[i], atol=ATOL, rtol=0)


@torch.no_grad()
def test_meteora_forced_one_hot_equals_oracle(mm):
    batch = _batch(mm)
    task = ["b", "c", "a"]
    oracle = mm(**batch, task_ids=task).logits
    mm.set_router("meteora", top_k=2, temperature=30.0)
    forced = mm(**batch, task_ids=task, force_gates=True).logits
    torch.testing.assert_close(forced, oracle, atol=ATOL, rtol=0)
    free = mm(**batch, task_ids=task).logits  # untrained gates route elsewhere
    assert (free - oracle).abs().max() > 1e-3


@torch.no_grad()
def test_meteora_top1_uses_gate_argmax(mm):
    """top-1 weight is exactly 1: the output equals the oracle with each token's own argmax adapter (one layer)."""
    mm.set_router("meteora", top_k=1)
    lin = mm.model.get_submodule("model.layers.0.self_attn.q_proj")
    x = torch.randn(2, 5, lin.in_features)
    mm.router.begin_forward(None, None, x, True)
    out = lin(x)
    choice = mm.router.gates[lin.module_name.replace(".", "__")](x).argmax(-1)
    A, B, s, r = mm.bank.tensors(lin.module_name)
    want = lin.base_layer(x)
    for a in range(3):
        sel = choice == a
        want[sel] += s[a] * (x[sel] @ A[a, :, : r[a]]) @ B[a, : r[a]]
    torch.testing.assert_close(out, want, atol=ATOL, rtol=0)


def test_route_top_p_rules():
    probs = torch.tensor([[0.2, 0.5, 0.3], [0.9, 0.05, 0.05]])
    ids, w = route_top_p(probs, 0.6)
    assert ids.tolist() == [[1, 2], [0, -1]]
    torch.testing.assert_close(w[0], torch.softmax(torch.tensor([0.5, 0.3]), 0))  # DLP-LoRA: softmax of kept probs
    assert w[1].tolist() == [1.0, 0.0]
    ids, w = route_top_p(probs, 0.6, fusion="renorm")
    torch.testing.assert_close(w[0], torch.tensor([0.625, 0.375]))
    ids, _ = route_top_p(probs, 1.0)
    assert sorted(ids[0].tolist()) == [0, 1, 2]
    ids, w = route_top_p(probs, 1e-9)
    assert ids.tolist() == [[1], [0]] and w.tolist() == [[1.0], [1.0]]


@torch.no_grad()
def test_dlp_small_p_equals_top1_oracle(mm):
    batch = _batch(mm)
    mm.set_router("dlp", hidden=32, top_p=1e-6)
    torch.manual_seed(0)
    for p in mm.router.parameters():
        p.normal_(0, 1.0)  # spread the logits so the choice differs per prompt
    out = mm(**batch).logits
    ids, w = mm.last_route()
    top1 = mm.router.logits(batch["input_ids"], batch["attention_mask"]).argmax(-1)
    assert ids.shape[1] == 1 and ids[:, 0].tolist() == top1.tolist() and w.eq(1).all()
    mm.set_router("oracle")
    torch.testing.assert_close(out, mm(**batch, task_ids=top1.tolist()).logits, atol=ATOL, rtol=0)


@torch.no_grad()
def test_dlp_route_ignores_left_padding(mm):
    """The sentence embedding averages real tokens only: a padded row routes exactly as when alone."""
    mm.set_router("dlp", hidden=32, top_p=0.9)
    batch = _batch(mm)
    mm(**batch)
    ids_b, w_b = mm.last_route()
    for i, p in enumerate(PROMPTS):
        mm(**mm.tokenizer([p], return_tensors="pt"))
        ids_1, w_1 = mm.last_route()
        k = ids_1.shape[1]
        assert ids_b[i, :k].tolist() == ids_1[0].tolist()
        torch.testing.assert_close(w_b[i, :k], w_1[0])


@torch.no_grad()
def test_merge_equals_peft_weighted_adapters(assets, mm, peft_ref):
    batch = _batch(mm)
    mm.set_router("merge")  # average of the deltas == peft "cat" with weights 1/L
    names = ["a", "b", "c"]
    peft_ref.add_weighted_adapter(names, [1 / 3] * 3, "avg_cat", combination_type="cat")
    torch.testing.assert_close(mm(**batch).logits, _peft_logits(peft_ref, batch, "avg_cat"), atol=ATOL, rtol=0)
    assert mm.last_route()[0].shape[1] == 1  # one merged LoRA per row, at any stacked rank
    # peft's "linear" (task arithmetic on A and B, equal ranks): mode="linear" on a bank of a and c
    base, dirs = assets
    model, _tok = load_base_model(base)
    mm2 = MultiLoRAModel.from_adapters(model, {n: str(dirs[n]) for n in ("a", "c")}, router="merge", mode="linear")
    peft_ref.add_weighted_adapter(["a", "c"], [0.5, 0.5], "avg_lin", combination_type="linear")
    torch.testing.assert_close(mm2(**batch).logits, _peft_logits(peft_ref, batch, "avg_lin"), atol=ATOL, rtol=0)
    mm2.set_router("merge", mode="delta")
    delta = mm2(**batch).logits
    assert (delta - _peft_logits(peft_ref, batch, "avg_lin")).abs().max() > 1e-4  # the two merges differ


@torch.no_grad()
def test_lora_b_and_base(mm, peft_ref):
    batch = _batch(mm)
    mm.set_router("lora_b", adapter="c")
    torch.testing.assert_close(mm(**batch).logits, _peft_logits(peft_ref, batch, "c"), atol=ATOL, rtol=0)
    mm.set_router("base")
    with peft_ref.disable_adapter():
        torch.testing.assert_close(mm(**batch).logits, peft_ref(**batch).logits, atol=ATOL, rtol=0)


def test_meteora_loss_and_gate_gradients_through_fused_op(mm):
    batch = _batch(mm)
    mm.set_router("meteora", top_k=2, aux_loss_coef=0.0)  # LM loss only: gradients must come through the op
    params = mm.set_trainable("gates")
    assert params and all("router.gates" in n for n, p in mm.named_parameters() if p.requires_grad)
    out = mm(**batch, labels=batch["input_ids"], task_ids=[0, 1, 2])
    out.loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    assert out.loss.item() == pytest.approx(out.lm_loss.item())
    mm.set_router("meteora", top_k=1, aux_loss_coef=50.0)
    mm.set_trainable("gates")
    out = mm(**batch, labels=batch["input_ids"], task_ids=[0, 1, 2])
    assert out.loss.item() == pytest.approx(out.lm_loss.item() + 50.0 * out.aux_loss.item(), rel=1e-5)
    assert 0.5 < out.aux_loss.item() < 5  # CE over 3 classes at random init
    with torch.no_grad():  # validation reports the aux loss too; without task ids there is none
        assert mm(**batch, task_ids=[0, 1, 2])["aux_loss"].item() == pytest.approx(out.aux_loss.item(), rel=1e-5)
        assert mm(**batch).get("aux_loss") is None


def test_right_padded_rows_give_the_masked_forwards_loss_gradients_and_gate_counts(mm):
    """``right_padded``: the model runs without the mask (no host read in transformers' mask code), the router
    with it. On right-padded rows every real token's output, so the loss, the gates' gradients and their counts
    are those of the masked forward; on left-padded rows the two differ (the flag is for right padding only)."""
    mm.tokenizer.padding_side = "right"
    batch = mm.tokenizer(PROMPTS, return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    assert (batch["attention_mask"][:, 0] == 1).all() and (batch["attention_mask"] == 0).any()
    mm.set_router("meteora", top_k=2, aux_loss_coef=50.0)
    gates = mm.set_trainable("gates")
    runs = []
    for right_padded in (False, True):
        mm.zero_grad(set_to_none=True)
        out = mm(**batch, labels=labels, task_ids=[0, 1, 2], right_padded=right_padded)
        out.loss.backward()
        runs.append((out.loss.detach(), out.aux_loss.detach(), [g.grad.clone() for g in gates]))
        assert mm.ctx.token_mask is None  # the call's mask does not outlive it
    (loss0, aux0, g0), (loss1, aux1, g1) = runs
    torch.testing.assert_close(loss1, loss0, atol=1e-5, rtol=0)
    torch.testing.assert_close(aux1, aux0, atol=1e-6, rtol=0)
    for a, b in zip(g1, g0, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    mm.eval()
    with torch.no_grad():
        counts = []
        for right_padded in (False, True):
            mm(**batch, task_ids=[0, 1, 2], right_padded=right_padded)
            counts.append([t.tolist() for t in mm.router.gate_hits_by_task()])
        assert counts[0] == counts[1]
        mm.tokenizer.padding_side = "left"
        left = mm.tokenizer(PROMPTS, return_tensors="pt", padding=True)
        want = mm(**left, labels=left["input_ids"].masked_fill(left["attention_mask"] == 0, -100), task_ids=[0, 1, 2])
        got = mm(**left, labels=left["input_ids"].masked_fill(left["attention_mask"] == 0, -100), task_ids=[0, 1, 2],
                 right_padded=True)
        assert not torch.allclose(got.lm_loss, want.lm_loss, atol=1e-4)


def test_learning_gates_route_as_coefficients_with_the_output_of_the_inference_route(mm):
    """While the gates learn, a projection's route is the [T, L] coefficient form (kernels.multi_lora_coef); at
    inference it is ids/weights (what the Triton kernels read). The two give the layer the same output."""
    mm.set_router("meteora", top_k=2)
    lin = mm.model.get_submodule("model.layers.0.self_attn.q_proj")
    x = torch.randn(2, 5, lin.in_features, generator=torch.Generator().manual_seed(0))
    mm.router.begin_forward(None, None, x, True)
    with torch.no_grad():
        inference = lin(x)
        route = mm.router.route(lin.module_name, x)
    assert route.coef is None and route.ids.shape == (10, 2)
    mm.set_trainable("gates")
    route = mm.router.route(lin.module_name, x)
    assert route.ids is None and route.coef.shape == (10, 3) and route.coef.requires_grad
    torch.testing.assert_close(lin(x), inference, atol=ATOL, rtol=0)


def test_gate_hits_by_task_count_each_tasks_tokens_in_eval_mode(mm):
    """Per task: the (token, projection) pairs whose top-1 gate chose it, and all its labelled pairs. Zeroed gates
    tie every logit, and the top-1 of a tie is adapter 0: task 0's pairs all hit, task 2's none; the sums are the
    global accuracy's; train mode counts nothing."""
    batch = _batch(mm)
    mm.set_router("meteora", top_k=2)
    mm.eval()
    with torch.no_grad():
        for gate in mm.router.gates.values():
            gate.weight.zero_()
        mm(**batch, task_ids=[2, 0, 2])
        hits, pairs = mm.router.gate_hits_by_task()
        real = batch["attention_mask"].sum(1)  # labelled tokens per row; 14 projections each
        assert pairs.tolist() == [int(real[1]) * 14, 0, int(real[0] + real[2]) * 14]
        assert hits.tolist() == [int(real[1]) * 14, 0, 0]
        assert float(mm.router.gate_accuracy()) == pytest.approx(float(real[1] / real.sum()))
        mm.set_router("meteora", top_k=2)
        mm.eval()  # (a new router starts in train mode, as any module)
        mm(**batch, task_ids=[2, 0, 2])  # fresh gates: hits somewhere in between, summing to the global count
        hits, pairs = mm.router.gate_hits_by_task()
        assert (hits <= pairs).all() and float(hits.sum() / pairs.sum()) == pytest.approx(float(mm.router.gate_accuracy()))
    mm.train()
    mm(**batch, task_ids=[2, 0, 2])
    assert mm.router.gate_hits_by_task() is None and mm.router.gate_accuracy() is None


def test_gate_hits_by_projection_sum_to_the_pooled_hits_and_match_each_gate_by_hand(mm):
    """Per projection gate (in the order of ``router.gates``): the labelled tokens its top-1 routed to their task,
    and the labelled tokens. Zeroed gates choose adapter 0 everywhere: with every row on task 0 each gate hits every
    labelled token (and no pad token, which has no label). Fresh gates: the hits summed over the gates are the
    per-task hits summed over the tasks (the pooled count), and one layer-1 gate's hits equal argmax(gate(x)) ==
    task over the labelled tokens of the very input that gate read (caught by a forward hook)."""
    batch = _batch(mm)
    real = int(batch["attention_mask"].sum())
    assert real < batch["attention_mask"].numel(), "the batch must hold pad tokens for the test to mean anything"
    mm.set_router("meteora", top_k=2)
    mm.eval()
    with torch.no_grad():
        for gate in mm.router.gates.values():
            gate.weight.zero_()
        mm(**batch, task_ids=[0, 0, 0])
        hits, tokens = mm.router.gate_hits_by_projection()
        assert hits.tolist() == [real] * 14 and int(tokens) == real
        torch.manual_seed(3)
        mm.set_router("meteora", top_k=2)
        mm.eval()
        keys = list(mm.router.gates)
        key = "model__layers__1__mlp__down_proj"
        seen = []
        hook = mm.router.gates[key].register_forward_hook(lambda m, args, out: seen.append(args[0].clone()))
        task = [2, 0, 1]
        mm(**batch, task_ids=task)
        hook.remove()
        hits, tokens = mm.router.gate_hits_by_projection()
        task_hits, _ = mm.router.gate_hits_by_task()
        assert hits.shape == (14,) and int(hits.sum()) == int(task_hits.sum()) and int(tokens) == real
        assert float(hits.sum()) / (14 * real) == pytest.approx(float(mm.router.gate_accuracy()))
        [x] = seen  # [B * S, d_in]: the gate reads each projection's input once
        labels = torch.tensor(task)[:, None].expand_as(batch["attention_mask"]).reshape(-1)
        labelled = batch["attention_mask"].reshape(-1) == 1
        expected = int(((mm.router.gates[key](x).argmax(-1) == labels) & labelled).sum())
        i = keys.index(key)
        assert int(hits[i]) == expected and 0 < expected < real  # fresh gates: some hits, not all
        assert len(set(hits.tolist())) > 1, "gates that all count alike cannot tell a misplaced count"
    mm.train()
    mm(**batch, task_ids=task)
    assert mm.router.gate_hits_by_projection() is None
    mm.set_router("oracle")
    assert mm.router.gate_hits_by_projection() is None  # a router without gates counts none


def test_gate_hits_in_a_mask_split_the_per_task_hits_and_match_every_gate_by_hand(mm):
    """``gate_hits_in(mask)``: per task, the (token, gate) hits and pairs over the labelled tokens inside the mask
    (the answer tokens, in the route stage). A mask and its complement add up to ``gate_hits_by_task``; the counts
    equal every gate's argmax == task at those tokens, counted by hand from the inputs the gates read; pad tokens
    (no label) count nowhere, even inside the mask; train mode counts nothing."""
    batch = _batch(mm)
    attention = batch["attention_mask"]
    assert int(attention.sum()) < attention.numel(), "the batch must hold pad tokens for the test to mean anything"
    torch.manual_seed(5)
    mm.set_router("meteora", top_k=2)
    mm.eval()
    seen = {}
    hooks = [g.register_forward_hook(lambda m, args, out, k=k: seen.__setitem__(k, args[0].clone()))
             for k, g in mm.router.gates.items()]  # (a hook that returns a value replaces the gate's output)
    task = [2, 0, 2]
    with torch.no_grad():
        mm(**batch, task_ids=task)
    for h in hooks:
        h.remove()
    mask = torch.zeros_like(attention)
    mask[:, -4:] = 1
    mask[1, 0] = 1
    hits, pairs = mm.router.gate_hits_in(mask)
    rest_hits, rest_pairs = mm.router.gate_hits_in(1 - mask)
    all_hits, all_pairs = mm.router.gate_hits_by_task()
    assert (hits + rest_hits).tolist() == all_hits.tolist() and (pairs + rest_pairs).tolist() == all_pairs.tolist()
    ones = mm.router.gate_hits_in(torch.ones_like(mask))
    assert ones[0].tolist() == all_hits.tolist() and ones[1].tolist() == all_pairs.tolist()
    labels = torch.tensor(task)[:, None].expand_as(attention)
    inside = (attention == 1) & (mask == 1)
    want_hits, want_pairs = torch.zeros(3, dtype=torch.long), torch.zeros(3, dtype=torch.long)
    for key, gate in mm.router.gates.items():
        with torch.no_grad():
            chosen = gate(seen[key]).argmax(-1).view_as(attention)
        want_hits.index_add_(0, labels[inside], (chosen == labels)[inside].long())
        want_pairs.index_add_(0, labels[inside], torch.ones_like(labels[inside]))
    assert len(seen) == 14 and hits.tolist() == want_hits.tolist() and pairs.tolist() == want_pairs.tolist()
    assert 0 < int(hits.sum()) < int(pairs.sum())  # fresh gates: some hits, not all
    mm.train()
    mm(**batch, task_ids=task)
    assert mm.router.gate_hits_in(mask) is None
    mm.set_router("oracle")
    assert mm.router.gate_hits_in(mask) is None  # a router without gates counts none


def test_gate_confusion_equals_every_gates_argmax_counted_by_hand(mm):
    """``gate_confusion``: [L, L] counts of (labelled token's task, its top-1 gate's choice) summed over every gate.
    Fresh gates, each gate's input caught by a forward hook: the matrix equals the argmax of each gate on the very
    input it read, counted over the labelled tokens only (pad tokens have none); its diagonal and row sums are
    ``gate_hits_by_task``'s hits and pairs. Train mode counts nothing."""
    batch = _batch(mm)
    torch.manual_seed(5)
    mm.set_router("meteora", top_k=2)
    mm.eval()
    seen = {}
    def keep(key):  # a forward hook that returns None (a returned value would replace the gate's output)
        return lambda m, args, out: seen.__setitem__(key, args[0].clone())

    hooks = [g.register_forward_hook(keep(k)) for k, g in mm.router.gates.items()]
    task = [2, 0, 1]
    with torch.no_grad():
        mm(**batch, task_ids=task)
    for h in hooks:
        h.remove()
    L = mm.router.gates[next(iter(mm.router.gates))].out_features
    labels = torch.tensor(task)[:, None].expand_as(batch["attention_mask"]).reshape(-1)
    labelled = batch["attention_mask"].reshape(-1) == 1
    expected = torch.zeros(L, L, dtype=torch.long)
    with torch.no_grad():
        for k, x in seen.items():
            chosen = mm.router.gates[k](x).argmax(-1)
            for t, c in zip(labels[labelled].tolist(), chosen[labelled].tolist(), strict=True):
                expected[t, c] += 1
    got = mm.router.gate_confusion()
    assert len(seen) == 14 and got.tolist() == expected.tolist()
    assert (expected - torch.diag(expected.diagonal())).sum() > 0, "fresh gates must misroute some tokens"
    hits, pairs = mm.router.gate_hits_by_task()
    assert hits.tolist() == got.diagonal().tolist() and pairs.tolist() == got.sum(1).tolist()
    mm.train()
    mm(**batch, task_ids=task)
    assert mm.router.gate_confusion() is None


def test_gates_and_adapters_trainable(mm):
    batch = _batch(mm)
    mm.set_router("meteora")
    params = mm.set_trainable("gates+adapters")
    n_gate = sum(1 for n, p in mm.named_parameters() if p.requires_grad and "gates" in n)
    assert n_gate == 14 and len(params) == 14 + 2 * 14
    mm(**batch, labels=batch["input_ids"], task_ids=[0, 1, 2]).loss.backward()
    A = mm.bank.slots["model__layers__0__self_attn__q_proj"].A
    assert A.grad is not None and A.grad[:, :, :4].abs().sum() > 0
    assert A.grad[1, :, 4:].abs().sum() == 0  # padding past b's rank 4 is never touched


def test_dlp_router_gradients_through_fused_op_and_ce(mm):
    batch = _batch(mm)
    mm.set_router("dlp", hidden=32, top_p=1.0)  # keep all adapters: weights depend on the router
    params = mm.set_trainable("router")
    assert params and all(n.startswith("router.mlp") for n, p in mm.named_parameters() if p.requires_grad)
    mm(**batch, labels=batch["input_ids"]).loss.backward()
    assert all(p.grad is not None for p in params) and params[-1].grad.abs().sum() > 0
    for p in params:
        p.grad = None
    mm.router_loss(batch["input_ids"], batch["attention_mask"], ["a", "b", "c"]).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)


def test_dlp_default_router_is_about_5m_params_on_smollm2_width():
    from models.routing.dlp import DLPRouter
    from models.routing.route import RouteContext

    ctx = RouteContext()
    ctx.bank = [None] * 28
    r = DLPRouter(ctx, torch.nn.Embedding(10, 576))
    n = sum(p.numel() for p in r.parameters())
    assert 4.5e6 < n < 5.5e6


@torch.no_grad()
def test_merge_follows_in_place_changes_and_swaps(assets, mm, peft_ref):
    batch = _batch(mm)
    mm.set_router("merge")
    before = mm(**batch).logits
    for s in mm.bank.slots.values():
        s.B.mul_(2.0)  # e.g. an optimizer step on the adapters: the merged slot must be rebuilt
    doubled = mm(**batch).logits
    assert (doubled - before).abs().max() > 1e-3
    mm.set_router("merge")  # a fresh router has no cache: the old one must agree with it
    torch.testing.assert_close(doubled, mm(**batch).logits, atol=0, rtol=0)
    mm.remove_adapter("b")
    mm.remove_adapter("c")
    mm.set_router("merge")
    for s in mm.bank.slots.values():
        s.B.mul_(0.5)
    torch.testing.assert_close(mm(**batch).logits, _peft_logits(peft_ref, batch, "a"), atol=ATOL, rtol=0)


@torch.no_grad()
def test_merge_of_many_adapters_is_one_lora_at_any_stacked_rank(assets):
    """17 copies of adapter a (stacked rank 136): their merge, one LoRA of rank 136 run as two GEMMs, is the average
    of 17 equal deltas, i.e. adapter a itself."""
    base, dirs = assets
    model, tok = load_base_model(base)
    mm = MultiLoRAModel.from_adapters(model, {f"a{i}": str(dirs["a"]) for i in range(17)}, tokenizer=tok,
                                      router="merge")
    batch = _batch(mm)
    merged = mm(**batch).logits
    assert mm.last_route()[0].shape[1] == 1
    mm.set_router("oracle")
    torch.testing.assert_close(merged, mm(**batch, task_ids=[0] * batch["input_ids"].shape[0]).logits, atol=ATOL,
                               rtol=0)


def test_finetune_loss_on_right_padded_rows_is_the_masked_loss(assets):
    """finetune runs its peft model without the attention mask (its rows are right-padded, labels -100 past each
    row's end): the loss and the LoRA gradients are the masked forward's."""
    from data.batches import AnswerOnlyCollator
    from pipeline.stages.finetune import LoRAFinetuneModule

    base, dirs = assets
    model, tok = load_base_model(base)
    pm = PeftModel.from_pretrained(model, str(dirs["a"]), is_trainable=True)
    rows = [tok(p)["input_ids"] for p in PROMPTS]
    batch = AnswerOnlyCollator(tok.pad_token_id)([{"input_ids": r, "labels": r} for r in rows])
    assert (batch["attention_mask"] == 0).any()
    module = LoRAFinetuneModule(pm, lr=1e-3)
    lora = [p for n, p in pm.named_parameters() if p.requires_grad]
    got = module._loss(batch)
    got.backward()
    g_got = [p.grad.clone() for p in lora]
    pm.zero_grad(set_to_none=True)
    want = pm(**batch, use_cache=False).loss
    want.backward()
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    for a, b in zip(g_got, [p.grad for p in lora], strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
