"""``kernels.packed_gate``: while MeteoRA's gates learn over a frozen bank, a projection's base output, every
adapter's shrink and its gate's logits are one GEMM. It must be the unpacked projection's arithmetic: the same
outputs, losses and gate gradients, eagerly and compiled, in fewer kernel launches."""

from __future__ import annotations

import tempfile

import pytest
import torch
from torch._dynamo.utils import counters

from kernels.packed_gate import packed_gate_gemm


def test_packed_gemm_is_the_concatenated_linear_with_its_gradients_in_x_and_the_gate_only():
    g = torch.Generator().manual_seed(0)
    T, d_in, d_out, L, R = 7, 12, 10, 5, 3
    x = torch.randn(T, d_in, dtype=torch.float64, generator=g, requires_grad=True)
    W = torch.randn(d_out, d_in, dtype=torch.float64, generator=g)
    A_cat = torch.randn(d_in, L * R, dtype=torch.float64, generator=g)
    G = torch.randn(L, d_in, dtype=torch.float64, generator=g, requires_grad=True)
    dy = torch.randn(T, d_out + L * R + L, dtype=torch.float64, generator=g)
    parts = packed_gate_gemm(x, W, A_cat, G)
    assert [p.shape[1] for p in parts] == [d_out, L * R, L]
    assert parts[0].stride(0) % 8 == 0  # the packed rows padded: the product's row stride a multiple of 8
    got = torch.cat(parts, 1)
    dx, dG = torch.autograd.grad(parts, (x, G), dy.split([d_out, L * R, L], 1))
    want = torch.nn.functional.linear(x, torch.cat([W, A_cat.t(), G], 0))
    wdx, wdG = torch.autograd.grad(want, (x, G), dy)
    for a, b in ((got, want), (dx, wdx), (dG, wdG)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    h, logits = packed_gate_gemm(x, None, A_cat, G)  # the base GEMM apart: the shrink and the logits
    want2 = torch.nn.functional.linear(x, torch.cat([A_cat.t(), G], 0))
    torch.testing.assert_close(torch.cat([h, logits], 1), want2, rtol=1e-12, atol=1e-12)
    dx2, dG2 = torch.autograd.grad((h, logits), (x, G), dy.split([d_out, L * R, L], 1)[1:])
    wdx2, wdG2 = torch.autograd.grad(want2, (x, G), dy[:, d_out:])
    torch.testing.assert_close(dx2, wdx2, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dG2, wdG2, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="base weight and the bank must be frozen"):
        packed_gate_gemm(x, W.requires_grad_(), A_cat, G)


def _gates_model(dtype=torch.float32):
    from models import MultiLoRAModel, load_base_model
    from models.tiny import save_test_assets

    base, dirs = save_test_assets(tempfile.mkdtemp())
    model, tok = load_base_model(base)
    torch.manual_seed(0)
    mm = MultiLoRAModel.from_adapters(model.to(dtype), {n: str(d) for n, d in dirs.items()}, tokenizer=tok,
                                      router="meteora")
    mm.to(dtype)
    params = mm.set_trainable("gates")
    return mm, params, len(dirs)


def _step(mm, params, n, packed: bool, train: bool = True, with_base: bool = True):
    mm.router.pack_gates, mm.router.pack_base = packed, with_base
    mm.train(train)
    ids = torch.randint(5, 100, (3, 11), generator=torch.Generator().manual_seed(1))
    with torch.enable_grad():
        out = mm(input_ids=ids, labels=ids, task_ids=torch.arange(3) % n)
        grads = torch.autograd.grad(out.loss, params)
    return out.loss.detach(), out["aux_loss"].detach(), grads, mm.router.gate_confusion()


@pytest.mark.parametrize("with_base", [True, False], ids=["base_packed", "base_apart"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "validation"])
def test_a_packed_gate_step_equals_the_unpacked_one(train, with_base):
    """The same loss, aux loss and gate gradients (and, in eval mode with grad on as the route stage validates, the
    same routing counts) packed or not, the base weight in the packed GEMM or not, in fp64 where the two orders of
    the same products agree to rounding."""
    mm, params, n = _gates_model(torch.float64)
    got, want = _step(mm, params, n, True, train, with_base), _step(mm, params, n, False, train)
    torch.testing.assert_close(got[0], want[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got[1], want[1], rtol=1e-10, atol=1e-12)
    for a, b in zip(got[2], want[2], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    if not train:
        assert torch.equal(got[3], want[3])


def test_packing_takes_fewer_kernel_launches():
    """Not a timing: each gated projection runs one GEMM forward and one for its input gradient, where apart it
    ran three of each and added the input gradients."""
    from torch.profiler import ProfilerActivity, profile

    from pipeline.stages.op_count import leaf_launches

    mm, params, n = _gates_model()
    launches = {}
    for packed in (False, True):
        _step(mm, params, n, packed)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            _step(mm, params, n, packed)
        launches[packed] = sum(leaf_launches(prof.events()).values())
    assert launches[True] < launches[False], launches


def test_the_packed_gate_compiles_without_a_graph_break():
    """Compiled decoder layers trace the packed GEMM's autograd Function whole (no graph break) and give the eager
    step's loss and gate gradients."""
    from models.compile import compile_layers

    mm, params, n = _gates_model()
    eager = _step(mm, params, n, True)
    torch._dynamo.reset()
    counters.clear()
    compile_layers(mm.model, backend="aot_eager")
    try:
        compiled = _step(mm, params, n, True)
    finally:
        torch._dynamo.reset()
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    torch.testing.assert_close(compiled[0], eager[0], rtol=1e-5, atol=1e-6)
    for a, b in zip(compiled[2], eager[2], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
