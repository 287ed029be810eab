"""``kernels.packed_gemv``: a projection group's decode GEMV with the uniform LoRA in its epilogue, one launch.

Each case lays a group out as ``ProjectionGroup`` packs it for a uniform route: W = [members' base rows | the
adapter's shrink rows (each member's A^T, zero rows up to a multiple of 8) | rows the routed modes add], B_slot
[E, N] block-diagonal with the scale folded in. The torch backend (the two-launch form) and the Triton kernel
(interpreted on CPU) are held to a float64 evaluation of each member's ``x W_m^T + s (x A_m) B_m`` on fresh random
inputs. Poison: NaN in every row of W past N + E, in x's rows past T (x a view of a longer buffer) and in the
output buffer before the kernel writes it must never reach the result.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before kernels.triton_packed_gemv is first imported

from kernels import gemv_lora, switches
from kernels.packed_gemv import gemv_lora_torch

DEV = "cuda" if torch.cuda.is_available() else "cpu"  # where backend="triton" runs (interpreted on CPU)
NAN = float("nan")
SHRINK_ALIGN = 8  # models.projection_groups.SHRINK_ALIGN (checked below)


def make_group(sizes, d_in, T, R=6, seed=0, dtype=torch.float64, tail=5):
    """(x, W, N, E, B_slot, want): a packed group over fresh random weights, ``want`` its float64 output.

    x is the first T rows of a buffer whose later rows are NaN; W has ``tail`` NaN rows past N + E."""
    g = torch.Generator().manual_seed(seed)
    n, N = len(sizes), sum(sizes)
    ranks = [R - m % 3 for m in range(n)]  # members of different ranks: the packed rows are their widest rank
    E = -(-n * R // SHRINK_ALIGN) * SHRINK_ALIGN
    base = torch.randn(N, d_in, generator=g, dtype=torch.float64) / d_in**0.5
    A = [torch.randn(d_in, r, generator=g, dtype=torch.float64) / d_in**0.5 for r in ranks]
    B = [torch.randn(r, d, generator=g, dtype=torch.float64) for r, d in zip(ranks, sizes)]
    scale = 2.0
    W = torch.full((N + E + tail, d_in), NAN, dtype=torch.float64)
    W[:N] = base
    W[N:N + E] = 0.0
    B_slot = torch.zeros(E, N, dtype=torch.float64)
    c = 0
    for m, (a, b) in enumerate(zip(A, B)):
        W[N + m * R:N + m * R + a.shape[1]] = a.T
        B_slot[m * R:m * R + b.shape[0], c:c + b.shape[1]] = scale * b
        c += b.shape[1]
    xbuf = torch.full((T + 3, d_in), NAN, dtype=torch.float64)
    xbuf[:T] = torch.randn(T, d_in, generator=g, dtype=torch.float64)
    x = xbuf[:T]
    outs, r0 = [], 0
    for m, d in enumerate(sizes):
        outs.append(x @ base[r0:r0 + d].T + scale * (x @ A[m]) @ B[m])
        r0 += d
    want = torch.cat(outs, 1)
    return x.to(dtype), W.to(dtype), N, E, B_slot.to(dtype), want


GROUPS = [((48,), 40), ((48, 16, 16), 72), ((40, 24), 33)]  # one member; q/k/v-like; widths not multiples of 16


@pytest.mark.parametrize("sizes, d_in", GROUPS)
@pytest.mark.parametrize("T", [1, 5, 17])
def test_torch_backend_matches_fp64(sizes, d_in, T):
    x, W, N, E, B_slot, want = make_group(sizes, d_in, T)
    got = gemv_lora(x, W, N, E, B_slot, backend="torch")
    assert got.dtype == torch.float64 and not got.isnan().any()
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("sizes, d_in", GROUPS)
@pytest.mark.parametrize("T", [1, 5, 17])
@pytest.mark.parametrize("block_n", [16, 32])
def test_triton_matches_fp64(sizes, d_in, T, block_n):
    """fp32 through the kernel (ieee dots), poisoned output buffer, NaN rows of W past N + E and of x past T."""
    x, W, N, E, B_slot, want = make_group(sizes, d_in, T, seed=T + block_n, dtype=torch.float32)
    with switches.poisoned_buffers():
        got = gemv_lora(x.to(DEV), W.to(DEV), N, E, B_slot.to(DEV), backend="triton", block_n=block_n,
                        block_k=16)  # fmt: skip
    assert not got.isnan().any()
    torch.testing.assert_close(got.double().cpu(), want, rtol=1e-4, atol=1e-4)


def test_triton_base_alone_and_into_out():
    """E = 0 is the base GEMV alone; ``out`` (a NaN buffer, row stride wider than N) is written in full."""
    x, W, N, _, _, _ = make_group((48, 16), 40, 3, dtype=torch.float32)
    base_want = x.double() @ W[:N].double().T
    outbuf = torch.full((3, N + 7), NAN, device=DEV)
    out = outbuf[:, :N]
    got = gemv_lora(x.to(DEV), W.to(DEV), N, 0, out=out, backend="triton", block_n=16, block_k=16)
    assert got.data_ptr() == out.data_ptr() and outbuf[:, N:].isnan().all()
    torch.testing.assert_close(got.double().cpu(), base_want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gemv_lora(x, W, N, 0, backend="torch").double(), base_want, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(DEV == "cpu", reason="Triton 3.7's CPU interpreter multiplies bf16 tl.dot tiles wrongly (a "
                    "16x16 bf16 product came out ~1e10 off); fp32 covers the kernel's logic there, compile_check its "
                    "bf16 compile")
def test_triton_bf16_against_the_two_launch_form():
    """bf16 (the decode dtype): the one launch against the two-launch form's fp32 evaluation, within bf16 rounding
    (the fused form rounds h as the GEMM output stores it, and the sum once)."""
    x, W, N, E, B_slot, want = make_group((48, 16, 16), 72, 4, seed=3, dtype=torch.bfloat16)
    got = gemv_lora(x.to(DEV), W.to(DEV), N, E, B_slot.to(DEV), backend="triton", block_n=16, block_k=32)
    err = (got.double().cpu() - want).norm() / want.norm()
    assert err < 2e-2, err


def test_the_shrink_rows_are_used():
    """A mutation check: zeroing B_slot must change the output (the epilogue is not silently skipped)."""
    x, W, N, E, B_slot, _ = make_group((32,), 24, 2, dtype=torch.float32)
    full = gemv_lora(x.to(DEV), W.to(DEV), N, E, B_slot.to(DEV), backend="triton", block_n=16, block_k=16)
    base = gemv_lora(x.to(DEV), W.to(DEV), N, E, torch.zeros_like(B_slot).to(DEV), backend="triton", block_n=16,
                     block_k=16)  # fmt: skip
    assert (full - base).abs().max() > 1e-2


def test_refuses_bad_calls():
    x, W, N, E, B_slot, _ = make_group((16,), 24, 2, dtype=torch.float32)
    for kwargs, msg in [({"backend": "cuda"}, "unknown backend"), ({"block_n": 24}, "block_n"),
                        ({"block_k": 8}, "block_k"), ({"out": torch.empty(2, N + 1)}, "out must be")]:  # fmt: skip
        with pytest.raises(ValueError, match=msg):
            gemv_lora(x, W, N, E, B_slot, **kwargs)
    with pytest.raises(ValueError, match="N \\+ E"):
        gemv_lora(x, W, N + 100, E, B_slot)
    with pytest.raises(ValueError, match="B_slot"):
        gemv_lora(x, W, N, E, B_slot[:, 1:])
    with pytest.raises(ValueError, match="one dtype"):
        gemv_lora(x.double(), W, N, E, B_slot)
    with pytest.raises(ValueError, match="inference only"):
        gemv_lora(x.requires_grad_(), W, N, E, B_slot)


def test_shrink_align_matches_the_model():
    from models.projection_groups import SHRINK_ALIGN as model_align

    assert SHRINK_ALIGN == model_align


def test_torch_form_is_the_auto_cpu_path():
    x, W, N, E, B_slot, _ = make_group((48, 16), 40, 3, dtype=torch.float32)
    assert torch.equal(gemv_lora(x, W, N, E, B_slot), gemv_lora_torch(x, W, N, E, B_slot))


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 8])
def test_gpu_gemv_lora_matches_and_captures(T):
    """On a GPU: bf16 at an 8B-like q/k/v group against the two-launch form in fp32, and the kernel in a CUDA graph.

    The kernel rounds h = x A to bf16 before h @ B_slot (as the two-launch form stores it) and rounds its output:
    each error is at most bf16's unit roundoff (2^-8) of its term, so an output may be off by 2^-8 (|h| @ |B_slot| +
    |out|), which is far more than 2e-2 of a small output where the base and LoRA terms cancel (at 2bcc900 on an
    H100: 0.0425 at (7, 576), where want is 0.86; its float64 emulation gives the same element and error). The
    bound below is twice that (an h that rounds the other way on another accumulation order stays inside), at
    most ~0.6 here; a wrong column or member is off by about a LoRA term, |h @ B_slot| ~ 6."""
    x, W, N, E, B_slot, _ = make_group((512, 128, 128), 512, T, R=8, dtype=torch.bfloat16)
    x, W, B_slot = x.cuda().contiguous(), W[:N + E].cuda(), B_slot.cuda()
    want = gemv_lora_torch(x.float(), W.float(), N, E, B_slot.float())
    h = x.float() @ W[N:N + E].float().T
    bound = 2**-7 * (h.abs() @ B_slot.float().abs() + want.abs()) + 1e-3
    out = torch.empty(T, N, dtype=torch.bfloat16, device="cuda")
    gemv_lora(x, W, N, E, B_slot, out=out)
    assert ((out.float() - want).abs() <= bound).all()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        gemv_lora(x, W, N, E, B_slot, out=out)
    out.zero_()
    graph.replay()
    assert ((out.float() - want).abs() <= bound).all()
