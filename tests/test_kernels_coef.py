"""The op with a [T, L] coefficient route (kernels.coef, MeteoRA's gates while they train): its float64 definition,
the ids/weights op it replaces, and poison that must stay where no token routes."""

import math

import pytest
import torch
from test_kernels import TOL, make_inputs, rel_err

from kernels import multi_lora, multi_lora_coef
from kernels.coef import bank_known_clean, multi_lora_coef_reference
from kernels.dense import bank_matrices
from kernels.gate_mix import top_k_coef
from models.routing.route import route_top_k

LEAVES = ("x", "base", "A", "B", "coef")


def _coef(inp) -> torch.Tensor:
    """ids/weights [T, K] (-1 = empty) as the [T, L] matrix: each slot's weight added at its adapter."""
    ids, w = inp["ids"], inp["weights"]
    L = inp["A"].shape[0]
    return torch.zeros(ids.shape[0], L, dtype=w.dtype).scatter_add(1, ids.clamp(min=0), torch.where(ids >= 0, w, 0))


def _run(fn, inp, coef, grad):
    leaves = {k: (coef if k == "coef" else inp[k]).detach().clone().requires_grad_(True) for k in LEAVES}
    out = fn(leaves["x"], leaves["base"], leaves["A"], leaves["B"], inp["scales"], inp["ranks"], leaves["coef"])
    out.backward(grad.to(out.dtype))
    return out, {k: v.grad for k, v in leaves.items()}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("K", "routing", "seed"), [(2, "uniform", 0), (1, "zipf", 1), (3, "one", 2)])
def test_coef_op_is_its_definition_in_value_and_every_gradient(dtype, K, routing, seed):
    inp = make_inputs(13, 12, 10, 5, 8, K, dtype, routing=routing, seed=seed)
    coef = _coef(inp)
    grad = torch.randn(13, 10, generator=torch.Generator().manual_seed(seed + 7), dtype=torch.float64)
    out, grads = _run(multi_lora_coef, inp, coef, grad)
    ref, ref_grads = _run(multi_lora_coef_reference, {k: (v.double() if v.is_floating_point() else v)
                                                      for k, v in inp.items()}, coef.double(), grad)
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert rel_err(out, ref) < TOL[dtype], "output"
    routed = coef != 0  # the op's coef gradient is the dense function's, defined at every entry; a route built by a
    grads["coef"] = grads["coef"] * routed  # scatter (top_k_coef) reads it only where routed, as the definition has
    for k in LEAVES:
        assert rel_err(grads[k], ref_grads[k]) < TOL[dtype] * 4, k


def test_coef_op_equals_the_ids_weights_op_it_replaces():
    inp = make_inputs(9, 8, 6, 4, 8, 2, torch.float64, seed=4)
    want = multi_lora(inp["x"], inp["base"], inp["A"], inp["B"], inp["scales"], inp["ranks"], inp["ids"],
                      inp["weights"], backend="reference")
    got = multi_lora_coef(inp["x"], inp["base"], inp["A"], inp["B"], inp["scales"], inp["ranks"], _coef(inp))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_top_k_coef_holds_the_top_k_softmax_at_the_chosen_adapters():
    logits = torch.randn(7, 6, generator=torch.Generator().manual_seed(5), requires_grad=True)
    ids, w = route_top_k(logits, 2, temperature=3.0)
    coef = top_k_coef(logits, 2, temperature=3.0)
    torch.testing.assert_close(coef.gather(1, ids), w)
    assert int((coef != 0).sum(1).max()) == 2 and torch.allclose(coef.sum(1), torch.ones(7))
    coef.sum(0)[1].backward()  # the gates learn through the scatter: the chosen logits get a gradient
    assert logits.grad.abs().sum() > 0


@pytest.mark.parametrize("shape", [(7, 6), (3, 5, 28), (64, 28)])
@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("temperature", [1.0, 15.0])
def test_top_k_coef_by_row_maxima_is_the_topk_definition(shape, k, temperature):
    """top_k_coef finds its k adapters as row maxima, not by a sort: the same matrix and the same gradient in the
    logits as the definition (torch.topk, softmax over the k values / T, scattered into zeros), fp32 and bf16."""
    gen = torch.Generator().manual_seed(k * 100 + len(shape))
    rows, L = math.prod(shape[:-1]), shape[-1]
    for dtype in (torch.float32, torch.bfloat16):  # distinct in each row (topk breaks ties its own way): a permutation
        ranks = torch.stack([torch.randperm(L, generator=gen) for _ in range(rows)]).reshape(shape)
        logits = (ranks * 0.25 - 3).to(dtype).requires_grad_(True)
        ids, w = route_top_k(logits, k, temperature)
        want = torch.zeros(shape, dtype=w.dtype).scatter(-1, ids, w)
        got = top_k_coef(logits, k, temperature)
        assert got.dtype == torch.float32 and torch.equal(got != 0, want != 0)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
        grad = torch.randn(shape, generator=gen)
        g_want, = torch.autograd.grad((want * grad).sum(), logits)
        g_got, = torch.autograd.grad((got * grad).sum(), logits)
        torch.testing.assert_close(g_got, g_want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_poison_in_unrouted_adapters_and_rank_padding_reaches_nothing(value):
    """Adapter 3 holds NaN/Inf and no token routes to it; adapter 1 has it past its rank. Output and every
    gradient equal a clean run's; then a token routed to adapter 3 gets a NaN row and the others stay as they were."""
    inp = make_inputs(10, 8, 6, 4, 8, 2, torch.float32, ranks=[8, 5, 8, 8], empty=0.0, seed=6)
    inp["ids"] = torch.where(inp["ids"] == 3, torch.zeros_like(inp["ids"]), inp["ids"])
    coef = _coef(inp)
    grad = torch.randn(10, 6, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    clean, clean_grads = _run(multi_lora_coef, inp, coef, grad)
    bad = dict(inp, A=inp["A"].clone(), B=inp["B"].clone())
    bad["A"][3, 2, 4] = value
    bad["B"][3, 1, 5] = value
    bad["A"][1, :, 6] = value  # past adapter 1's rank 5
    for frozen in (False, True):  # the bank a training step updates, and a frozen one (its clean check is cached)
        got, grads = (_run(multi_lora_coef, bad, coef, grad) if not frozen else
                      (multi_lora_coef(*(bad[k] for k in ("x", "base", "A", "B", "scales", "ranks")), coef), None))
        torch.testing.assert_close(got, clean, rtol=0, atol=0)
        for k in LEAVES if grads else ():
            if k in ("A", "B"):  # the poisoned entries themselves have gradient 0 (nobody read them)
                torch.testing.assert_close(grads[k].nan_to_num(0.0), clean_grads[k], rtol=0, atol=0, msg=k)
                assert torch.isfinite(grads[k]).all(), k
            else:  # coef: where routed (elsewhere it is the dense function's, read by no scatter-built route)
                mask = coef != 0 if k == "coef" else torch.ones_like(grads[k], dtype=torch.bool)
                torch.testing.assert_close(grads[k][mask], clean_grads[k][mask], rtol=0, atol=0, msg=k)
                assert torch.isfinite(grads[k]).all(), k
    routed = coef.clone()
    routed[4, 3] = 0.5  # token 4 now reads adapter 3
    out = multi_lora_coef(*(bad[k] for k in ("x", "base", "A", "B", "scales", "ranks")), routed)
    assert torch.isnan(out[4]).all()
    keep = torch.arange(10) != 4
    torch.testing.assert_close(out[keep], clean[keep].detach(), rtol=0, atol=0)


def test_a_frozen_clean_bank_is_known_clean_once_and_a_trained_or_broken_one_is_not():
    inp = make_inputs(4, 8, 6, 3, 8, 1, torch.float32, seed=9)
    A, B, ranks = inp["A"], inp["B"], inp["ranks"]
    assert bank_known_clean(A, B, ranks, bank_matrices(A, B, ranks)[2])
    A.requires_grad_(True)
    assert not bank_known_clean(A, B, ranks, bank_matrices(A, B, ranks)[2])  # a training step may change it
    A.requires_grad_(False)
    with torch.no_grad():
        A[1, 0, 0] = float("nan")  # an in-place write: the cached answer is stale
    assert not bank_known_clean(A, B, ranks, bank_matrices(A, B, ranks)[2])


def test_coef_of_the_wrong_shape_is_one_clear_error():
    inp = make_inputs(4, 8, 6, 3, 8, 1, torch.float32, seed=10)
    with pytest.raises(ValueError, match=r"multi_lora_coef: coef has shape \(4, 2\), expected \[tokens, adapters\] "
                                         r"= \[4, 3\]"):
        multi_lora_coef(inp["x"], inp["base"], inp["A"], inp["B"], inp["scales"], inp["ranks"], torch.zeros(4, 2))


def test_a_gate_training_step_dispatches_under_80_ops_per_projection():
    """Not a timing: the number of torch ops one MeteoRA gate step dispatches (each a launch or a graph kernel on a
    GPU). 126 per projection with the ids/weights route, 82 with the coefficient route and eval-only accuracy, 72
    with the gates' CE taken once over all projections and the scales kept in the expand's weight."""
    from pipeline.stages.op_count import count_step_ops

    total, projections, ops = count_step_ops("meteora", "gates")
    assert projections == 14 and total / projections < 80, ops.most_common(8)
    assert "aten::scatter_add" not in ops and "aten::argmax" not in ops  # no ids -> coefficient rebuild, no accuracy


def test_a_frozen_banks_scaled_expand_is_kept_and_follows_its_scales():
    """The scales ride in the expand's weight, kept while the bank is frozen: the same tensor on the next call, a
    new one (and the reference's output) after the scales change in place."""
    from kernels.coef import scaled_expand

    inp = make_inputs(6, 8, 6, 3, 8, 2, torch.float64, seed=11)
    coef = _coef(inp)
    args = lambda: (inp["x"], inp["base"], inp["A"], inp["B"], inp["scales"], inp["ranks"], coef)
    torch.testing.assert_close(multi_lora_coef(*args()), multi_lora_coef_reference(*args()), rtol=1e-12, atol=1e-12)
    B_cat = bank_matrices(inp["A"], inp["B"], inp["ranks"])[1]
    kept = scaled_expand(B_cat, inp["scales"], 8, torch.float64)
    assert scaled_expand(B_cat, inp["scales"], 8, torch.float64) is kept
    inp["scales"].mul_(2.0)  # an in-place change: the kept weight is stale
    assert scaled_expand(B_cat, inp["scales"], 8, torch.float64) is not kept
    torch.testing.assert_close(multi_lora_coef(*args()), multi_lora_coef_reference(*args()), rtol=1e-12, atol=1e-12)
