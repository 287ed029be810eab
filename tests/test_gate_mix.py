"""``kernels.gate_mix``: a learning gate's top-k route, the multiply with every adapter's shrink and the gate's CE, one
Triton kernel forward and one backward (run here under TRITON_INTERPRET=1). Held to the float64 definition on fresh
random inputs, through row-strided views, with poisoned buffers (NaN reaches only a token routed to a broken
adapter), and in the model: a MeteoRA gate step with the fused route equals the coefficient-matrix step, eagerly and
compiled without a graph break."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before kernels.triton_gate_mix is first imported

from test_packed_gate import _gates_model as gates_model
from test_packed_gate import _step as packed_gate_step

from kernels.gate_mix import TopKGate, gate_mix, gate_mix_torch, top_k_coef
from kernels.switches import poisoned_buffers

CASES = [  # T, L, R, top_k, temperature, labelled
    (7, 5, 3, 2, 1.0, True),
    (9, 28, 8, 2, 15.0, True),
    (5, 4, 8, 1, 1.0, False),
    (6, 3, 2, 3, 2.0, True),
    (11, 6, 4, 2, 30.0, False),
]


def _inputs(T, L, R, labelled, seed, strided=False):
    g = torch.Generator().manual_seed(seed)
    if strided:  # column blocks of one wider product, as the packed GEMM hands them over
        wide = torch.randn(T, 5 + L * R + L + 3, dtype=torch.float64, generator=g)
        h, z = wide[:, 5:5 + L * R].clone(), wide[:, 5 + L * R:5 + L * R + L].clone()
        wide[:, 5:5 + L * R], wide[:, 5 + L * R:5 + L * R + L] = h, z
        h, z = wide[:, 5:5 + L * R], wide[:, 5 + L * R:5 + L * R + L]
    else:
        h = torch.randn(T, L * R, dtype=torch.float64, generator=g)
        z = torch.randn(T, L, dtype=torch.float64, generator=g) * 2
    labels = torch.randint(0, L, (T,), generator=g) if labelled else None
    if labels is not None:
        labels[0] = -100  # an unlabelled token (a pad) takes no CE
    dhc = torch.randn(T, L * R, dtype=torch.float64, generator=g)
    dce = torch.rand((), dtype=torch.float64, generator=g) + 0.5
    return h, z, labels, dhc, dce


def _run(h, z, labels, broken, k, temperature, R, dhc, dce, backend, dtype):
    h = h.to(dtype).detach().requires_grad_()
    z = z.to(dtype).detach().requires_grad_()
    hc, ce = gate_mix(h, z, labels, broken, k, temperature, R, backend=backend)
    loss = (torch.nan_to_num(hc.double()) * dhc).sum() + ce.double() * dce
    dh, dz = torch.autograd.grad(loss, (h, z))
    return hc.double(), ce.double(), dh.double(), dz.double()


@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided"])
@pytest.mark.parametrize("case", CASES, ids=[f"T{c[0]}-L{c[1]}-R{c[2]}-k{c[3]}" for c in CASES])
def test_the_kernels_equal_the_float64_definition_forward_and_backward(case, strided):
    T, L, R, k, temperature, labelled = case
    for seed in range(2):
        h, z, labels, dhc, dce = _inputs(T, L, R, labelled, seed, strided)
        broken = torch.zeros(L, dtype=torch.bool)
        want = _run(h, z, labels, broken, k, temperature, R, dhc, dce, "torch", torch.float64)
        with poisoned_buffers():
            got = _run(h, z, labels, broken, k, temperature, R, dhc, dce, "triton", torch.float32)
        for name, a, b in zip(("hc", "ce", "dh", "dlogits"), got, want, strict=True):
            assert torch.isfinite(a).all(), name
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)
        if not labelled:
            assert got[1].item() == 0.0


def test_the_route_is_the_top_k_softmax_and_the_ce_is_the_gate_cross_entropy():
    """The definition itself, written apart: top-k softmax of logits / T at the chosen adapters, CE of the raw
    logits against the labelled tokens' tasks."""
    T, L, R, k, temperature = 6, 5, 2, 2, 3.0
    h, z, labels, _, _ = _inputs(T, L, R, True, 3)
    hc, ce = gate_mix(h.float(), z.float(), labels, torch.zeros(L, dtype=torch.bool), k, temperature, R,
                      backend="triton")
    vals, ids = torch.topk(z / temperature, k, dim=-1)
    coef = torch.zeros(T, L, dtype=torch.float64).scatter(1, ids, torch.softmax(vals, -1))
    torch.testing.assert_close(coef, top_k_coef(z, k, temperature).double(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(hc.double(), (h.view(T, L, R) * coef[:, :, None]).view(T, L * R), rtol=1e-5,
                               atol=1e-6)
    keep = labels != -100
    want_ce = torch.nn.functional.cross_entropy(z[keep], labels[keep], reduction="sum")
    torch.testing.assert_close(ce.double(), want_ce, rtol=1e-5, atol=1e-5)


def test_nan_reaches_only_the_tokens_routed_to_a_broken_adapter():
    """A broken adapter (a non-finite value below its rank) makes NaN rows of hc and dh exactly where a token
    routes to it, as the dense form does; every other element of every buffer the kernels write is finite, with
    those buffers poisoned; the logits' gradient stays finite everywhere."""
    T, L, R, k = 12, 6, 4, 2
    h, z, labels, dhc, dce = _inputs(T, L, R, True, 5)
    broken = torch.zeros(L, dtype=torch.bool)
    broken[2] = True
    z[0, 2] = 9.0  # token 0 routes to the broken adapter; the others as their logits fall
    with poisoned_buffers():
        got = _run(h, z, labels, broken, k, 1.0, R, dhc, dce, "triton", torch.float32)
    want = _run(h, z, labels, broken, k, 1.0, R, dhc, dce, "torch", torch.float64)
    routed = (top_k_coef(z, k) != 0)[:, 2]
    assert routed[0] and not routed.all()
    for a, b in zip(got, want, strict=True):
        assert torch.equal(torch.isnan(a), torch.isnan(b))
    hc, _, dh, dz = got
    cols = torch.zeros(L * R, dtype=torch.bool)
    cols[2 * R:3 * R] = True  # the broken adapter's shrink columns: NaN in a routed token's hc, nowhere else
    assert torch.isnan(hc[routed][:, cols]).all() and torch.isfinite(hc[routed][:, ~cols]).all()
    assert torch.isfinite(hc[~routed]).all()
    assert torch.isfinite(dh[~routed]).all() and torch.isfinite(dz).all()
    for name, a, b in zip(("hc", "ce", "dh", "dlogits"), got, want, strict=True):
        torch.testing.assert_close(torch.nan_to_num(a), torch.nan_to_num(b), rtol=1e-5, atol=1e-5, msg=name)


def test_bad_arguments_get_one_line():
    h, z, labels, _, _ = _inputs(4, 3, 2, True, 0)
    broken = torch.zeros(3, dtype=torch.bool)
    with pytest.raises(ValueError, match="need h"):
        gate_mix(h[:, :5], z, labels, broken, 2, 1.0, 2)
    with pytest.raises(ValueError, match="top_k"):
        gate_mix(h, z, labels, broken, 4, 1.0, 2)
    with pytest.raises(ValueError, match="unknown backend"):
        gate_mix(h, z, labels, broken, 2, 1.0, 2, backend="cuda")


def test_a_top_k_gate_hands_its_ce_to_its_router_once():
    h, z, labels, _, _ = _inputs(5, 4, 2, True, 1)
    seen = []
    gate = TopKGate(z, 2, 1.0, labels=labels, on_ce=seen.append, backend="torch")
    hc = gate.mix(h, torch.zeros(4, dtype=torch.bool), 2)
    want_hc, want_ce = gate_mix_torch(h, z, labels, torch.zeros(4, dtype=torch.bool), 2, 1.0, 2)
    assert torch.equal(hc, want_hc) and len(seen) == 1 and torch.equal(seen[0], want_ce)
    gate.dense()
    assert len(seen) == 2 and torch.allclose(seen[1], want_ce)


def _step(mm, params, n, fused: str, train: bool = True, packed: bool = False):
    """tests/test_packed_gate.py's gate step (loss, aux loss, gate gradients, confusion) with the route ``fused``."""
    mm.router.fused_route = fused
    return packed_gate_step(mm, params, n, packed, train, with_base=False)


@pytest.mark.parametrize("packed", [False, True], ids=["apart", "packed"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "validation"])
def test_a_fused_gate_step_equals_the_coefficient_matrix_step(train, packed):
    """The same loss, aux loss (MeteoRA's CE, now summed by the kernel) and gate gradients, and in eval mode the same
    routing counts, with the fused route (the Triton kernels, interpreted) as with the coefficient matrix."""
    mm, params, n = gates_model()
    got, want = _step(mm, params, n, "triton", train, packed), _step(mm, params, n, "off", train, packed)
    assert got[1] > 0
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-6)
    for a, b in zip(got[2], want[2], strict=True):
        assert a.abs().sum() > 0
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    if not train:
        assert torch.equal(got[3], want[3])


def test_the_fused_route_compiles_without_a_graph_break():
    from torch._dynamo.utils import counters

    from models.compile import compile_layers

    mm, params, n = gates_model()
    eager = _step(mm, params, n, "triton")
    torch._dynamo.reset()
    counters.clear()
    compile_layers(mm.model, backend="aot_eager")
    try:
        compiled = _step(mm, params, n, "triton")
    finally:
        torch._dynamo.reset()
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    torch.testing.assert_close(compiled[0], eager[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(compiled[1], eager[1], rtol=1e-5, atol=1e-6)
    for a, b in zip(compiled[2], eager[2], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_gpu_kernels_at_a_training_shape_match_and_capture(dtype):
    """On a GPU, SmolLM2's gate-training shape (T = 16384 tokens, 28 adapters of rank 8, top-2): the kernels in
    ``dtype`` against the float64 definition, forward and backward, and the forward replayed from a CUDA graph."""
    T, L, R, k = 16384, 28, 8, 2
    h, z, labels, dhc, dce = _inputs(T, L, R, True, 7)
    h, z = h.to(dtype).double(), z.to(dtype).double()  # the definition on the inputs as the kernels get them
    broken = torch.zeros(L, dtype=torch.bool)
    want = _run(h, z, labels, broken, k, 1.0, R, dhc, dce, "torch", torch.float64)
    cuda = [t.cuda() for t in (h, z, labels, broken, dhc, dce)]
    got = _run(*cuda[:4], k, 1.0, R, *cuda[4:], "triton", dtype)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    for name, a, b in zip(("hc", "ce", "dh", "dlogits"), got, want, strict=True):
        rtol = 1e-4 if name == "ce" else tol  # a sum of 16k fp32 terms either way
        torch.testing.assert_close(a.cpu(), b, rtol=rtol, atol=tol, msg=lambda m, name=name: f"{name}: {m}")
    hd, zd = cuda[0].to(dtype), cuda[1].to(dtype)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        hc, ce = gate_mix(hd, zd, cuda[2], cuda[3], k, 1.0, R)
    hc.zero_()
    graph.replay()
    torch.testing.assert_close(hc.double().cpu(), want[0], rtol=tol, atol=tol)
    torch.testing.assert_close(ce.double().cpu(), want[1], rtol=1e-4, atol=tol)
