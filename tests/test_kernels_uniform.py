"""The op when one host-known adapter serves every token (kernels.uniform): the reference's result and gradients."""

import pytest
import torch
from test_kernels import TOL, make_inputs, rel_err

from kernels import multi_lora_uniform
from kernels.reference import multi_lora_reference


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rank", [5, 8, 0])
def test_uniform_route_is_the_reference_with_every_token_on_one_adapter(dtype, rank):
    L, R, a = 4, 8, 2
    ranks = [8, 3, rank, 6]
    inp = make_inputs(11, 12, 10, L, R, 1, dtype, ranks=ranks, seed=rank, empty=0.0)
    inp["A"][a, :, rank:] = float("nan")  # past the adapter's rank: sliced away, never read
    inp["B"][a, rank:, :] = float("nan")
    ids = torch.full((11, 1), a)
    ones = torch.ones(11, 1, dtype=dtype)
    scale = float(inp["scales"][a])
    leaves = {k: inp[k].detach().clone().requires_grad_(True) for k in ("x", "base", "A", "B")}
    out = multi_lora_uniform(leaves["x"], leaves["base"], leaves["A"][a, :, :rank], leaves["B"][a, :rank], scale)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    out.backward(grad.to(out.dtype))
    ref_leaves = {k: inp[k].detach().double().nan_to_num(0.0).requires_grad_(True) for k in ("x", "base", "A", "B")}
    ref = multi_lora_reference(ref_leaves["x"], ref_leaves["base"], ref_leaves["A"], ref_leaves["B"],
                               inp["scales"].double(), torch.tensor(ranks), ids, ones.double())
    ref.backward(grad)
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert rel_err(out, ref) < TOL[dtype]
    def grads_of(d):  # r = 0: no path from the inputs to the delta, so no gradient at all
        return {k: torch.zeros_like(v) if v.grad is None else v.grad for k, v in d.items()}

    grads, ref_grads = grads_of(leaves), grads_of(ref_leaves)
    for k in ("x", "base"):
        if ref_grads[k].any():
            assert rel_err(grads[k], ref_grads[k]) < TOL[dtype], k
        else:
            assert not grads[k].any(), k
    for k, cut in (("A", (slice(None), slice(None), slice(0, rank))), ("B", (slice(None), slice(0, rank)))):
        g = grads[k]
        assert torch.isfinite(g).all() and not g[[i for i in range(L) if i != a]].any(), k  # only adapter a
        if rank:
            assert rel_err(g[a][cut[1:]], ref_grads[k][a][cut[1:]]) < TOL[dtype], k


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("bank", ["three_padded", "one_full_rank"])
def test_bank_uniform_gives_autograds_own_gradients_bit_for_bit(dtype, compiled, bank):
    """A trained bank's uniform route: the bank's gradients written directly (one zero fill and one copy each, or
    the products themselves for a bank of one adapter at full rank) are exactly autograd's through the slices, under
    bf16 too; poison elsewhere in the bank stays out."""
    from kernels import bank_uniform

    L, R, a, r, scale = (3, 16, 1, 5, 2.0) if bank == "three_padded" else (1, 6, 0, 6, 2.0)
    g = torch.Generator().manual_seed(int(dtype == torch.bfloat16) + 2 * compiled + 4 * (L == 1))
    A0 = torch.randn(L, 12, R, generator=g)
    B0 = torch.randn(L, R, 10, generator=g)
    if L == 3:
        A0[a, :, r:] = float("nan")  # rank padding of the routed adapter and every other adapter: poison
        B0[a, r:] = float("inf")
        A0[0], B0[2] = float("nan"), float("nan")
    x0 = torch.randn(2, 7, 12, generator=g).to(dtype)
    base0 = torch.randn(2, 7, 10, generator=g).to(dtype)
    grad = torch.randn(2, 7, 10, generator=g).to(dtype)

    def run(fn):
        x, base = x0.clone().requires_grad_(True), base0.clone().requires_grad_(True)
        A, B = A0.clone().requires_grad_(True), B0.clone().requires_grad_(True)
        out = fn(x, base, A, B)
        out.backward(grad)
        return out, x.grad, base.grad, A.grad, B.grad

    def direct(x, base, A, B):
        return bank_uniform(x, base, A, B, a, r, scale)

    if compiled:
        direct = torch.compile(direct, backend="aot_eager", fullgraph=True)
    ours = run(direct)
    theirs = run(lambda x, base, A, B: multi_lora_uniform(x, base, A[a, :, :r].to(dtype), B[a, :r].to(dtype), scale))
    for name, o, t in zip(("out", "x", "base", "A", "B"), ours, theirs):
        assert o.dtype == t.dtype and torch.equal(o, t), name
    dA, dB = ours[3], ours[4]
    assert torch.isfinite(dA).all() and torch.isfinite(dB).all()
    others = [i for i in range(L) if i != a]
    assert not dA[others].any() and not dA[a, :, r:].any() and not dB[others].any() and not dB[a, r:].any()
    assert dA.shape == A0.shape and dB.shape == B0.shape and dA.dtype == dB.dtype == A0.dtype
    with torch.no_grad():  # inference: the plain op, no autograd Function
        assert torch.equal(bank_uniform(x0, base0, A0, B0, a, r, scale), ours[0].detach())

