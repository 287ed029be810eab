"""Triton kernel of ``kernels.packed_gemv``: a decode GEMV over a packed weight with the uniform LoRA in its epilogue.

Imported lazily (TRITON_INTERPRET is read when the kernel is decorated). Grid (cdiv(T, BT), cdiv(N, BN)): a
program owns BT token rows (``kernels.packed_gemv.BLOCK_T``: ``tl.dot``'s smallest M; rows past T are masked) of one block of BN output
columns, and walks d_in in steps of BK:

  1. loads x[rows, k:k+BK] once and the block's base rows W[cols, k:k+BK], accumulating ``x W^T`` (fp32);
  2. with the same x tile, loads the E shrink rows W[N:N+E, k:k+BK] (the uniform adapter's A^T, every member's,
     E <= BE) and accumulates ``h = x A`` ([BT, BE], fp32). Every program recomputes h: its rows are read by all
     programs, so they stay in L2, and the HBM bytes are those of the one GEMV (the shrink rows once);
  3. after the loop rounds h to the weight's dtype (as the two-launch form stores it in the GEMM output) and adds
     ``h @ B_slot[:, cols]`` (B_slot [E, N]: each member's scaled B in its block, zeros elsewhere, so a column
     takes its own member's rank rows only);
  4. stores the sum once, in x's dtype.

Reads: W's first N + E rows, B_slot's block columns and x; nothing past row N + E of W (the packed bank and gate
rows of the routed modes), nothing past T of x. E = 0 (``HAS_LORA`` false) is the base GEMV alone: what this
form costs against cuBLAS's base GEMM, without the epilogue. Nothing is read back to the host: a CUDA graph
captures it.
"""

import torch
import triton
import triton.language as tl

from kernels.triton_kernels import _mma


@triton.jit
def gemv_lora_kernel(x_ptr, w_ptr, b_ptr, out_ptr, T, N, E, D, sxt, swn, sbe, sot,
                     BT: tl.constexpr, BN: tl.constexpr, BE: tl.constexpr, BK: tl.constexpr,
                     HAS_LORA: tl.constexpr, F32: tl.constexpr):  # fmt: skip
    """out[t, c] = x[t] . W[c] + (x[t] W[N:N+E]^T) . B_slot[:, c] for t < T, c < N (see the module doc)."""
    rows = tl.program_id(0) * BT + tl.arange(0, BT)
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    ee = tl.arange(0, BE)
    kk = tl.arange(0, BK)
    row_ok = rows < T
    col_ok = cols < N
    e_ok = ee < E
    acc = tl.zeros((BT, BN), tl.float32)
    h = tl.zeros((BT, BE), tl.float32)
    for k0 in range(0, D, BK):
        k = k0 + kk
        k_ok = k < D
        xt = tl.load(x_ptr + rows[:, None].to(tl.int64) * sxt + k[None, :], mask=row_ok[:, None] & k_ok[None, :],
                     other=0.0)  # fmt: skip
        wt = tl.load(w_ptr + cols[:, None].to(tl.int64) * swn + k[None, :], mask=col_ok[:, None] & k_ok[None, :],
                     other=0.0)  # fmt: skip
        acc = _mma(acc, xt, tl.trans(wt), F32)
        if HAS_LORA:
            at = tl.load(w_ptr + (N + ee[:, None]).to(tl.int64) * swn + k[None, :],
                         mask=e_ok[:, None] & k_ok[None, :], other=0.0)  # fmt: skip
            h = _mma(h, xt, tl.trans(at), F32)
    if HAS_LORA:
        bt = tl.load(b_ptr + ee[:, None].to(tl.int64) * sbe + cols[None, :], mask=e_ok[:, None] & col_ok[None, :],
                     other=0.0)  # fmt: skip
        acc = _mma(acc, h, bt, F32)  # h rounded to B's dtype: the stored h of the two-launch form (a GEMM output)
    tl.store(out_ptr + rows[:, None].to(tl.int64) * sot + cols[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])  # fmt: skip


def launch(x, W, N, E, B_slot, out, block_t, block_n, block_k, num_stages):
    """Launch over x [T, D], W [>= N + E, D], B_slot [E, N] (ignored at E = 0) into out [T, N], each with a unit
    column stride. fp32 inputs take ``tl.dot`` in full precision (``ieee``: tf32 would round them)."""
    T, D = x.shape
    b = B_slot if E else W  # any pointer: HAS_LORA false reads nothing of it
    grid = (triton.cdiv(T, block_t), triton.cdiv(N, block_n))
    gemv_lora_kernel[grid](x, W, b, out, T, N, E, D, x.stride(0), W.stride(0), b.stride(0), out.stride(0),
                           BT=block_t, BN=block_n, BE=max(16, triton.next_power_of_2(max(E, 1))), BK=block_k,
                           HAS_LORA=E > 0, F32=x.dtype == torch.float32, num_stages=num_stages)  # fmt: skip
    return out
