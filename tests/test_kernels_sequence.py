"""Sentence routing folded per sequence (kernels.sequence_concat) against the float64 reference: forward and every
gradient, empty slots, mixed ranks with NaN stored past each rank, the dispatch, and a routed model that generates
the same tokens with the folded form on and off."""

import pytest
import torch
from test_kernels import TOL, make_inputs, rel_err

from kernels import multi_lora_sequences, sequence_concat
from kernels.reference import multi_lora_reference
from kernels.sequence_concat import multi_lora_per_sequence

DIFF = ("x", "base", "A", "B", "weights")


def sequence_inputs(S, Lq, d_in, d_out, L, R, K, dtype, *, ranks, seed, empty=0.25):
    """x/base as [S, Lq, d] and per-sequence ids/weights [S, K] (every sequence keeps at least one adapter)."""
    inp = make_inputs(S * Lq, d_in, d_out, L, R, K, dtype, ranks=ranks, seed=seed, empty=0.0)
    g = torch.Generator().manual_seed(seed + 100)
    ids = torch.stack([torch.randperm(L, generator=g)[:K] for _ in range(S)])
    drop = torch.rand(S, K, generator=g) < empty
    drop[:, 0] = False
    inp["ids"] = torch.where(drop, torch.full_like(ids, -1), ids)
    inp["weights"] = (torch.rand(S, K, generator=g) + 0.1).to(dtype)
    inp["x"] = inp["x"].view(S, Lq, d_in)
    inp["base"] = inp["base"].view(S, Lq, d_out)
    return inp


def forward_and_grads(fn, inp, grad):
    leaves = {k: (v.detach().clone().requires_grad_(True) if k in DIFF else v) for k, v in inp.items()}
    out = fn(leaves)
    out.backward(grad.to(out.dtype))
    return out.detach(), {k: leaves[k].grad for k in DIFF}


def reference(inp):
    S, Lq, d_in = inp["x"].shape
    seq_ids = torch.arange(S).repeat_interleave(Lq)
    out = multi_lora_reference(inp["x"].reshape(-1, d_in), inp["base"].reshape(S * Lq, -1), inp["A"], inp["B"],
                               inp["scales"], inp["ranks"], inp["ids"], inp["weights"], seq_ids)
    return out.view(S, Lq, -1)


def folded(inp):
    return multi_lora_per_sequence(inp["x"], inp["base"], inp["A"], inp["B"], inp["scales"], inp["ranks"],
                                   inp["ids"], inp["weights"])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("K", [1, 3, 5])
def test_folded_sequences_match_the_reference(dtype, K):
    """Mixed ranks (R = 8, an unused adapter with rank 0), empty slots, NaN stored past every adapter's rank."""
    ranks = [8, 3, 0, 5, 1, 8, 2]
    inp = sequence_inputs(3, 6, 12, 10, 7, 8, K, dtype, ranks=ranks, seed=K)
    for a, r in enumerate(ranks):  # what the bank holds past r_a must never reach the output
        inp["A"][a, :, r:] = float("nan")
        inp["B"][a, r:, :] = float("nan")
    ref_inp = {k: (v.double() if v.is_floating_point() else v) for k, v in inp.items()}
    grad = torch.randn(inp["base"].shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    ref_out, ref_grads = forward_and_grads(reference, ref_inp, grad)
    out, grads = forward_and_grads(folded, inp, grad)
    assert out.dtype == dtype and torch.isfinite(out).all()
    errs = {"out": rel_err(out, ref_out)}
    for k in DIFF:
        g, rg = grads[k], ref_grads[k]
        if k in ("A", "B"):  # the reference has no gradient past r_a (NaN storage there): compare the used part
            used = torch.isfinite(inp[k])
            g, rg = g[used], rg[used]
        assert torch.isfinite(g).all(), f"grad of {k} not finite"
        errs[k] = rel_err(g, rg)
    tol = TOL[dtype]
    bad = {k: e for k, e in errs.items() if not e < tol}
    assert not bad, f"relative errors over {tol}: {bad}"


def test_gradcheck_of_the_folded_form():
    inp = sequence_inputs(2, 3, 5, 4, 4, 4, 3, torch.float64, ranks=[4, 2, 3, 1], seed=3)
    names = list(inp)

    def f(*vals):
        return folded(dict(zip(names, vals)))

    assert torch.autograd.gradcheck(f, [v.requires_grad_(True) if k in DIFF else v for k, v in inp.items()])


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_dispatch_folds_at_prefill_by_backend(monkeypatch, backend):
    """multi_lora_sequences at prefill (L >= SEQ_CONCAT_MIN_LEN): the torch backend folds every K, the Triton
    kernels only K >= SEQ_CONCAT_MIN_K; decode (L = 1) never folds; every path gives the reference's result."""
    calls = []
    real = sequence_concat.multi_lora_per_sequence
    monkeypatch.setattr(sequence_concat, "multi_lora_per_sequence", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(sequence_concat, "SEQ_CONCAT_MIN_K", 3)
    monkeypatch.setattr(sequence_concat, "SEQ_CONCAT_MIN_LEN", 2)
    monkeypatch.setenv("LORAMUX_KERNEL_BACKEND", backend)
    for Lq, K, folds in ((6, 3, True), (6, 2, backend == "torch"), (6, 1, backend == "torch"), (1, 5, False)):
        calls.clear()
        inp = sequence_inputs(2, Lq, 12, 10, 6, 8, K, torch.float32, ranks=[8, 3, 5, 1, 8, 2], seed=Lq + K)
        out = multi_lora_sequences(inp["x"], inp["base"], inp["A"], inp["B"], inp["scales"], inp["ranks"],
                                   inp["ids"], inp["weights"])
        assert bool(calls) == folds, (Lq, K)
        assert rel_err(out, reference({k: (v.double() if v.is_floating_point() else v) for k, v in inp.items()})) < 1e-5


def test_bad_shapes_name_the_layout():
    inp = sequence_inputs(2, 3, 5, 4, 4, 4, 3, torch.float32, ranks=[4, 2, 3, 1], seed=1)
    with pytest.raises(ValueError, match=r"x \[S, L, d_in\]"):
        multi_lora_per_sequence(inp["x"].reshape(6, 5), inp["base"], inp["A"], inp["B"], inp["scales"],
                                inp["ranks"], inp["ids"], inp["weights"])


def test_dispatch_keeps_the_kernels_past_the_gather_budget(monkeypatch):
    calls = []
    real = sequence_concat.multi_lora_per_sequence
    monkeypatch.setattr(sequence_concat, "multi_lora_per_sequence", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(sequence_concat, "SEQ_CONCAT_MIN_K", 1)
    inp = sequence_inputs(2, 4, 12, 10, 6, 8, 3, torch.float32, ranks=[8, 3, 5, 1, 8, 2], seed=5)
    args = [inp[k] for k in ("x", "base", "A", "B", "scales", "ranks", "ids", "weights")]
    monkeypatch.setattr(sequence_concat, "SEQ_CONCAT_MAX_BYTES", 2 * 3 * (12 + 10) * 8 * 4 - 1)  # one byte short
    multi_lora_sequences(*args)
    assert not calls
    monkeypatch.setattr(sequence_concat, "SEQ_CONCAT_MAX_BYTES", 2 * 3 * (12 + 10) * 8 * 4)
    multi_lora_sequences(*args)
    assert calls
