"""The multi-LoRA op: Triton kernels (interpreted on CPU) and the torch paths against a float64 reference.

Every check draws fresh random inputs (never zeros), poisons the kernels' buffers with NaN (so an element no
kernel wrote shows up) and compares the output and every gradient (x, base, A, B, weights) by relative error.
Under the interpreter every tl.dot runs in fp32 (the interpreter's bf16 dot is unreliable): fp16/bf16 cases there
test the data path and rounding of the storage dtype, not tensor-core arithmetic; the `gpu` tests cover that.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before kernels.triton_ops is first imported

from kernels import multi_lora
from kernels.dense import multi_lora_dense
from kernels.reference import multi_lora_reference

DEV = "cuda" if torch.cuda.is_available() else "cpu"  # where backend="triton" tests run (interpreted on CPU)
DIFF = ("x", "base", "A", "B", "weights")
TOL = {torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 2e-2, torch.float64: 1e-10}


def make_inputs(
    T, d_in, d_out, L, R, K, dtype, *, ranks=None, routing="uniform", empty=0.2, seed=0, device="cpu"
):
    """Random op inputs; routing 'uniform', 'one' (every token on adapter L-1) or 'zipf'; ``empty`` = share of -1."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, d_in, generator=g)
    base = torch.randn(T, d_out, generator=g)
    A = torch.randn(L, d_in, R, generator=g) / d_in**0.5
    B = torch.randn(L, R, d_out, generator=g) / R**0.5
    scales = torch.rand(L, generator=g) + 0.5
    if ranks is None:
        ranks = torch.randint(1, R + 1, (L,), generator=g)
    ranks = torch.as_tensor(ranks)
    if routing == "one":
        ids = torch.full((T, K), L - 1)
    elif routing == "zipf":
        p = 1.0 / torch.arange(1, L + 1, dtype=torch.float64)
        ids = torch.multinomial(p / p.sum(), T * K, replacement=True, generator=g).view(T, K)
    else:
        ids = torch.randint(0, L, (T, K), generator=g)
    ids = torch.where(torch.rand(T, K, generator=g) < empty, torch.full_like(ids, -1), ids)
    weights = torch.rand(T, K, generator=g) + 0.1
    cast = {"x": x, "base": base, "A": A, "B": B, "weights": weights}
    out = {k: v.to(device=device, dtype=dtype) for k, v in cast.items()}
    out.update(scales=scales.to(device), ranks=ranks.to(device), ids=ids.to(device))
    return out


def call(fn, inp, **kw):
    return fn(
        inp["x"],
        inp["base"],
        inp["A"],
        inp["B"],
        inp["scales"],
        inp["ranks"],
        inp["ids"],
        inp["weights"],
        **kw,
    )


def run_with_grads(fn, inp, grad_out, **kw):
    """Forward and backward of ``fn`` on leaf copies of ``inp``; returns (out, {name: grad})."""
    leaves = {k: (v.detach().clone().requires_grad_(True) if k in DIFF else v) for k, v in inp.items()}
    out = call(fn, leaves, **kw)
    out.backward(grad_out.to(out.dtype))
    return out.detach(), {k: leaves[k].grad for k in DIFF}


def rel_err(a, b):
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def check_against_fp64(inp, fn, tol, **kw):
    ref_inp = {k: (v.double() if v.is_floating_point() else v) for k, v in inp.items()}
    grad = torch.randn(inp["base"].shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ref_out, ref_grads = run_with_grads(multi_lora_reference, {k: v.cpu() for k, v in ref_inp.items()}, grad)
    out, grads = run_with_grads(fn, inp, grad.to(inp["base"].device), **kw)
    assert torch.isfinite(out).all(), "output has unwritten (NaN-poisoned) elements"
    errs = {"out": rel_err(out, ref_out)}
    for k in DIFF:
        assert grads[k] is not None and torch.isfinite(grads[k]).all(), (
            f"grad of {k} missing or not fully written"
        )
        errs[k] = rel_err(grads[k], ref_grads[k])
    bad = {k: e for k, e in errs.items() if not e < tol}
    assert not bad, f"relative errors over {tol}: {bad}"
    return errs


@pytest.fixture
def triton_ops(monkeypatch):
    from kernels import triton_ops

    monkeypatch.setattr(triton_ops, "POISON", True)
    return triton_ops


def test_reference_gradcheck():
    inp = make_inputs(5, 6, 7, 3, 4, 2, torch.float64, ranks=[4, 2, 3])
    names = list(inp)

    def f(*vals):
        return call(multi_lora_reference, dict(zip(names, vals)))

    args = [v.requires_grad_(True) if k in DIFF else v for k, v in inp.items()]
    assert torch.autograd.gradcheck(f, args)


def test_dense_torch_path_matches_reference():
    for K, routing in ((1, "uniform"), (2, "zipf"), (4, "one")):
        inp = make_inputs(23, 12, 10, 5, 8, K, torch.float64, ranks=[8, 3, 0, 5, 1], routing=routing, seed=K)
        check_against_fp64(inp, multi_lora_dense, 1e-10)
        inp32 = {k: (v.float() if v.is_floating_point() else v) for k, v in inp.items()}
        check_against_fp64(inp32, multi_lora, 1e-5, backend="torch")


F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
CASES = [(F32, 1, "small"), (F32, 2, "small"), (F32, 1, "grouped"), (F32, 2, "grouped"), (F32, 4, "grouped"),
         (F16, 2, "grouped"), (F16, 4, "small"), (BF16, 2, "small"), (BF16, 2, "grouped")]  # fmt: skip


@pytest.mark.parametrize("dtype,K,path", CASES)
def test_triton_matches_fp64_reference(triton_ops, monkeypatch, dtype, K, path):
    """Mixed ranks (24 = R, 5, 0 = unused adapter, 17) with R = 24 padded to 32 inside; d_out not a tile multiple."""
    monkeypatch.setattr(triton_ops, "SMALL_T_MAX", 10**9 if path == "small" else 0)
    inp = make_inputs(17 if K < 4 else 9, 40, 36, 4, 24, K, dtype, ranks=[24, 5, 0, 17], seed=K, device=DEV)
    check_against_fp64(inp, multi_lora, TOL[dtype], backend="triton")


@pytest.mark.parametrize("routing,L,K,T", [("one", 3, 2, 33), ("zipf", 128, 1, 16), ("uniform", 1, 1, 20)])
def test_triton_skewed_routing_and_bank_sizes(triton_ops, monkeypatch, routing, L, K, T):
    monkeypatch.setattr(triton_ops, "SMALL_T_MAX", 0)
    inp = make_inputs(T, 16, 20, L, 8, K, torch.float32, routing=routing, empty=0.3, seed=L, device=DEV)
    check_against_fp64(inp, multi_lora, TOL[torch.float32], backend="triton")


def test_all_slots_empty_gives_base_and_zero_adapter_grads(triton_ops):
    inp = make_inputs(6, 16, 16, 2, 16, 2, torch.float32, empty=1.0, device=DEV)
    out, grads = run_with_grads(multi_lora, inp, torch.randn(6, 16, device=DEV), backend="triton")
    assert torch.equal(out, inp["base"])
    for k in ("x", "A", "B", "weights"):
        assert torch.count_nonzero(grads[k]) == 0, k


def test_sentence_routing_equals_token_routing():
    inp = make_inputs(12, 16, 16, 3, 8, 2, torch.float32)
    seq_ids = torch.tensor([0] * 5 + [1] * 7)
    s_ids, s_w = inp["ids"][:2], inp["weights"][:2]
    tok = dict(inp, ids=s_ids[seq_ids], weights=s_w[seq_ids])
    for backend in ("torch", "triton", "reference"):
        if backend == "triton" and DEV == "cuda":
            inp, seq_ids, s_ids, s_w = (
                {k: v.cuda() for k, v in inp.items()},
                seq_ids.cuda(),
                s_ids.cuda(),
                s_w.cuda(),
            )
        got = multi_lora(
            *[inp[k] for k in ("x", "base", "A", "B", "scales", "ranks")],
            s_ids,
            s_w,
            seq_ids,
            backend=backend,
        )
        torch.testing.assert_close(got.cpu(), call(multi_lora_reference, tok), rtol=1e-5, atol=1e-5)


def test_leading_batch_dims_are_flattened():
    inp = make_inputs(12, 16, 16, 3, 8, 2, torch.float32)
    x3, b3 = inp["x"].view(3, 4, 16), inp["base"].view(3, 4, 16)
    got = multi_lora(x3, b3, *[inp[k] for k in ("A", "B", "scales", "ranks", "ids", "weights")])
    assert got.shape == (3, 4, 16)
    torch.testing.assert_close(got.view(12, 16), call(multi_lora_reference, inp))


def test_bad_shapes_raise_one_clear_line():
    inp = make_inputs(4, 8, 8, 2, 4, 1, torch.float32)
    with pytest.raises(ValueError, match="ids and weights") as e:
        multi_lora(
            *[inp[k] for k in ("x", "base", "A", "B", "scales", "ranks", "ids")], inp["weights"][:, :0].T
        )
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="unknown backend"):
        call(multi_lora, inp, backend="cuda-magic")


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 16, 300])
def test_gpu_bf16_against_fp64(T):
    inp = make_inputs(T, 512, 384, 28, 64, 2, torch.bfloat16, seed=T, device="cuda")
    check_against_fp64(inp, multi_lora, TOL[torch.bfloat16])


@pytest.mark.gpu
def test_gpu_fp32_against_fp64():
    inp = make_inputs(200, 256, 320, 6, 16, 2, torch.float32, seed=3, device="cuda")
    check_against_fp64(inp, multi_lora, 1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("T", [4, 256])
def test_gpu_forward_and_backward_capture_in_a_cuda_graph(T):
    inp = make_inputs(T, 256, 256, 8, 16, 2, torch.bfloat16, seed=5, device="cuda")
    leaves = {k: (v.clone().requires_grad_(True) if k in DIFF else v) for k, v in inp.items()}
    grad = torch.randn_like(inp["base"])

    def step():
        for v in leaves.values():
            v.grad = None
        out = call(multi_lora, leaves)
        out.backward(grad)
        return out.detach(), leaves["x"].grad, leaves["A"].grad, leaves["weights"].grad

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        eager = [t.clone() for t in step()]
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(captured, eager):
        torch.testing.assert_close(a, b)


@pytest.mark.gpu
def test_gpu_torch_compile_holds_the_op():
    inp = make_inputs(64, 128, 128, 4, 16, 2, torch.bfloat16, seed=7, device="cuda")
    compiled = torch.compile(lambda *a: call(multi_lora, dict(zip(inp, a))) * 2, fullgraph=True)
    got = compiled(*inp.values())
    torch.testing.assert_close(got, call(multi_lora, inp) * 2)
