"""One adapter per row, weight 1 (kernels.per_row): the reference's result and gradients, autograd's own bits for the
bank's gradients written directly, and poison in what no row routes to kept out."""

import pytest
import torch
from test_kernels import TOL, rel_err

from kernels import multi_lora_per_row
from kernels.per_row import _gather
from kernels.reference import multi_lora_reference

S, T, D_IN, D_OUT, L, R, RANK, SCALE = 4, 5, 12, 10, 5, 16, 6, 1.5
ROWS = [3, 1, 3, 0]  # adapters 2 and 4 unrouted; 3 taken by two rows (its gradient is their sum)


def _bank(seed: int, poison: bool = True):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(L, D_IN, R, generator=g) / D_IN**0.5
    B = torch.randn(L, R, D_OUT, generator=g) / R**0.5
    if poison:  # unrouted adapters and every adapter's rank padding: never read
        A[[2, 4]], B[[2, 4]] = float("nan"), float("inf")
        A[:, :, RANK:], B[:, RANK:] = float("nan"), float("nan")
    x = torch.randn(S, T, D_IN, generator=g)
    base = torch.randn(S, T, D_OUT, generator=g)
    grad = torch.randn(S, T, D_OUT, generator=g)
    return x, base, A, B, grad


def _run(fn, x, base, A, B, grad, dtype):
    leaves = [t.detach().to(dtype).requires_grad_(True) for t in (x, base)] + \
             [t.detach().clone().requires_grad_(True) for t in (A, B)]
    out = fn(*leaves)
    out.backward(grad.to(out.dtype))
    return [out.detach()] + [t.grad for t in leaves]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_per_row_is_the_reference_with_each_row_on_its_adapter(dtype):
    x, base, A, B, grad = _bank(seed=1)
    rows = torch.tensor(ROWS)
    ours = _run(lambda x, b, A, B: multi_lora_per_row(x, b, A, B, rows, RANK, SCALE), x, base, A.to(dtype),
                B.to(dtype), grad, dtype)
    ids = rows.repeat_interleave(T).reshape(-1, 1)
    ranks, scales = torch.full((L,), RANK), torch.full((L,), SCALE, dtype=torch.float64)

    def ref(x, b, A, B):
        return multi_lora_reference(x.reshape(S * T, D_IN), b.reshape(S * T, D_OUT), A, B, scales, ranks, ids,
                                    torch.ones(S * T, 1, dtype=torch.float64)).reshape(S, T, D_OUT)

    theirs = _run(ref, x, base, A.nan_to_num(0.0, 0.0, 0.0).double(), B.nan_to_num(0.0, 0.0, 0.0).double(), grad,
                  torch.float64)
    for name, o, t in zip(("out", "x", "base", "A", "B"), ours, theirs):
        assert torch.isfinite(o).all(), name
        assert rel_err(o, t) < TOL[dtype], name
    dA, dB = ours[3], ours[4]
    assert not dA[[2, 4]].any() and not dB[[2, 4]].any() and not dA[:, :, RANK:].any() and not dB[:, RANK:].any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("scale", [2.0, SCALE], ids=["power_of_two", "other"])
def test_per_row_gives_autograds_own_gradients_bit_for_bit(dtype, compiled, scale):
    """The bank's gradients written directly (one zero fill and one index_add each, the scale in each product's
    alpha) are exactly autograd's through the gather and the cut, rows that share an adapter included, where the
    scale is a power of two; for another scale within a rounding of them."""
    x, base, A, B, grad = _bank(seed=2 + compiled, poison=False)
    rows = torch.tensor(ROWS)

    def direct(x, b, A, B):
        return multi_lora_per_row(x, b, A, B, rows, RANK, scale)

    def plain(x, b, A, B):  # the same ops, differentiated by autograd
        A_s, B_s = _gather(A, B, rows, RANK, x.dtype, b.dtype)
        return torch.add(b, torch.bmm(torch.bmm(x, A_s).to(b.dtype), B_s), alpha=scale)

    if compiled:
        direct = torch.compile(direct, backend="aot_eager", fullgraph=True)
    ours, theirs = _run(direct, x, base, A, B, grad, dtype), _run(plain, x, base, A, B, grad, dtype)
    for name, o, t in zip(("out", "x", "base", "A", "B"), ours, theirs):
        assert o.dtype == t.dtype, name
        if scale == 2.0:
            assert torch.equal(o, t), name
        else:  # one rounding of the gradient's dtype apart at most (bf16: 8 bits of mantissa)
            tol = 2 ** -7 if dtype == torch.bfloat16 else 1e-6
            torch.testing.assert_close(o, t, rtol=tol, atol=tol * float(t.abs().max()), msg=name)
    with torch.no_grad():  # inference: the plain products, no autograd Function
        assert torch.equal(multi_lora_per_row(x.to(dtype), base.to(dtype), A, B, rows, RANK, scale), ours[0])


def test_per_row_refuses_what_it_cannot_take():
    x, base, A, B, _ = _bank(seed=3)
    with pytest.raises(ValueError, match=r"multi_lora_per_row: x \[S, T, d_in\], base \[S, T, d_out\] and rows \[S\]"):
        multi_lora_per_row(x, base, A, B, torch.tensor([0, 1]), RANK, SCALE)
    with pytest.raises(ValueError, match=r"adapter ids \[5\] are outside \[-1, 5\)"):
        multi_lora_per_row(x, base, A, B, torch.tensor([0, 1, 5, 0]), RANK, SCALE)
    assert multi_lora_per_row(x, base, A, B, torch.tensor(ROWS), 0, SCALE) is base
