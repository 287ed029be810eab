"""The bank-wide path: x times every adapter of the bank, the routing applied as a coefficient on the way out.

The routed op is ``out[t] = base[t] + sum_k w[t,k] s_a (x[t] @ A_a) @ B_a``. Lay the bank side by side, A as one
[d_in, L*R] matrix and B as one [L*R, d_out] matrix (column a*R + j is adapter a's rank direction j). Then

    h   = C * (x @ A_cat)                [T, L*R]   every adapter; C applied in the shrink's epilogue
    out = base + h @ B_cat                          one GEMM whatever K is (expand)
    C[t, a*R + j] = s_a * sum_k w[t,k] [ids[t,k] == a] * [j < r_a]

Two plain tensor-core GEMMs, no sorting, no routing metadata, no per-slot passes (the kernels read ids only to
build C): a prefill reads x once and writes out once for all K slots. The price is L / K times the routed FLOPs
(T * L*R * (d_in + d_out) multiply-adds), and on an H200 these skinny GEMMs run at ~210 TFLOP/s, so the path pays
only for narrow banks: ``triton_ops.forward_path`` takes it where the H200 measured it faster
(``outputs/tables/kernel_bench_paths.md``: L*R up to 128 bank columns at prefill, up to 64 at small T, up to 448
for outputs at least twice as wide as the input from T = 32). At L = 28 on 4096^2 it loses to the routed kernels
at every T: its decode expand has one row tile, so each program walks all bank columns.

The shrink applies C in its epilogue (built once per program, not per chunk of the expand: measured on an H200,
building it inside the expand's loop made the expand 3.5x slower than the whole grouped forward), so the expand is
a plain pipelined GEMM over h = C * u. At prefill h is stored in the data dtype (the grouped path's rounding
point); at small T the shrink is split over d_in to fill the GPU and h stays fp32 partials that the expand sums
first. At small T (``SKIP``) both kernels skip the bank columns no token of their row tile routes to, so a decode
step reads only the routed adapters. Sentence routing is read through seq_ids (``SEQ``), as in the token kernels.

Non-finite values in the bank: the shrink selects (``tl.where``), never multiplies by a zero coefficient, so A of
an unrouted adapter or past a rank never reaches h; the expand never reads B rows past a rank or of an adapter no
token of its row tile routes to (a zero in h times a NaN in B would still be NaN). So an unrouted adapter never
reaches an output; an adapter routed by one token of a row tile is multiplied, with h = 0, into the tile's other
tokens too, so a non-finite B row of a *routed* adapter can spoil its tile (16-128 tokens), where the routed
kernels keep it to the tokens routed to it.
"""

import triton
import triton.language as tl

from kernels.triton_kernels import _configs, _mma, _quick_bench, _route_row

# (BK, num_warps, num_stages): BM and BN of the shrink are fixed by the host (they set the split count and thereby
# the partials' shape); the expand tunes its column tile too (narrow ones give a decode step enough programs)
BANK_SHRINK_CONFIGS = _configs(("BK",), [(64, 4, 3), (128, 4, 3), (64, 8, 4), (128, 8, 3)], (16,))
BANK_EXPAND_CONFIGS = _configs(
    ("BN", "BK"), [(32, 32, 4, 3), (64, 32, 4, 3), (128, 32, 4, 3), (128, 64, 8, 3), (256, 32, 8, 3)], (32, 16)
)


@triton.jit
def _routed_in(ids_ptr, route, rm, j0, N: tl.constexpr, R: tl.constexpr, K: tl.constexpr, SKIP: tl.constexpr):
    """With SKIP: does any routing slot of the row tile name an adapter of bank columns [j0, j0 + N)? Else True."""
    if SKIP:
        hit = 0
        for k in tl.static_range(K):
            idk = tl.load(ids_ptr + route * K + k, mask=rm, other=-1)
            hit += tl.sum(((idk >= j0 // R) & (idk < (j0 + N + R - 1) // R)).to(tl.int32))
        live = hit > 0
    else:
        live = True
    return live


@triton.jit
def _bank_columns(ranks_ptr, j0, LR, N: tl.constexpr, R: tl.constexpr):
    """Bank columns j0 .. j0 + N: (column, adapter, rank direction, in the bank, below the adapter's rank)."""
    jj = j0 + tl.arange(0, N)
    a = jj // R
    c = jj % R
    jm = jj < LR
    return jj, a, c, jm, jm & (c < tl.load(ranks_ptr + a, mask=jm, other=0))


@triton.autotune(BANK_SHRINK_CONFIGS, key=["TB", "D", "LR", "BM", "BN", "K"], do_bench=_quick_bench)
@triton.jit
def bank_shrink_kernel(
    x_ptr, a_ptr, ranks_ptr, scales_ptr, ids_ptr, seq_ptr, gate_ptr, h_ptr,
    T, D, LR, CHUNK, TB,
    sxt, sxd, sal, sad, sar,
    R: tl.constexpr, K: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    SEQ: tl.constexpr, SKIP: tl.constexpr, F32: tl.constexpr,
):  # fmt: skip
    """h[s, t, j] = C[t, j] * (x[t, chunk s] @ A_cat[chunk s, j]), A_cat[d, a*R + c] = A[a, d, c] (0 past r_a).

    Grid: (cdiv(T, BM), cdiv(LR, BN), splits). C (the routing coefficient) is built once per program from the row
    tile's K slots, so h is already the routed, scaled rank activation: the expand is a plain GEMM. R is a
    compile-time constant so that a column's (adapter, rank) split is known to the compiler and A's rank-contiguous
    runs load as vectors. With SKIP a program whose adapters no row routes to writes nothing (the expand skips
    the same columns).
    """
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    rm = rows < T
    r64 = rows.to(tl.int64)
    route = _route_row(seq_ptr, rows, rm, SEQ)
    j_lo = tl.program_id(1) * BN
    if _routed_in(ids_ptr, route, rm, j_lo, BN, R, K, SKIP):
        jj, a, c, jm, cm = _bank_columns(ranks_ptr, j_lo, LR, BN, R)
        s = tl.program_id(2)
        d_lo = s * CHUNK
        d_hi = tl.minimum(d_lo + CHUNK, D)
        x_row = x_ptr + r64[:, None] * sxt
        a_col = a_ptr + a.to(tl.int64)[None, :] * sal + c[None, :] * sar
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for d0 in range(d_lo, d_hi, BK):
            dd = d0 + tl.arange(0, BK)
            dm = dd < d_hi
            xt = tl.load(x_row + dd[None, :] * sxd, mask=rm[:, None] & dm[None, :], other=0.0)
            wt = tl.load(a_col + dd[:, None].to(tl.int64) * sad, mask=dm[:, None] & cm[None, :], other=0.0)
            acc = _mma(acc, xt, wt, F32)
        coef = tl.zeros((BM, BN), dtype=tl.float32)
        for k in tl.static_range(K):
            idk = tl.load(ids_ptr + route * K + k, mask=rm, other=-1).to(tl.int32)
            wk = tl.load(gate_ptr + route * K + k, mask=rm, other=0.0).to(tl.float32)
            coef += tl.where(idk[:, None] == a[None, :], wk[:, None], 0.0)
        coef = tl.where(cm[None, :], coef * tl.load(scales_ptr + a, mask=jm, other=0.0)[None, :], 0.0)
        h = tl.where(coef != 0.0, acc * coef, 0.0)  # where, not a product: an unrouted adapter's NaN stays out
        ptrs = h_ptr + (s * T + r64)[:, None] * LR + jj[None, :]
        tl.store(ptrs, h.to(h_ptr.dtype.element_ty), mask=rm[:, None] & jm[None, :])


@triton.jit
def _bit_or(a, b):
    return a | b


@triton.jit
def _routed_bits(ids_ptr, route, rm, a0, K: tl.constexpr):
    """A 64-bit set over adapters a0 .. a0 + 63: bit i is set when some routing slot of the row tile names a0 + i.
    Empty slots (-1) and masked rows set nothing."""
    rowbits = tl.zeros(route.shape, dtype=tl.uint64)
    for k in tl.static_range(K):
        off = tl.load(ids_ptr + route * K + k, mask=rm, other=-1).to(tl.int32) - a0
        inside = (off >= 0) & (off < 64)
        rowbits |= tl.where(inside, tl.full(route.shape, 1, tl.uint64) << tl.where(inside, off, 0).to(tl.uint64), 0)
    return tl.reduce(rowbits, 0, _bit_or)


@triton.autotune(BANK_EXPAND_CONFIGS, key=["TB", "DO", "LR", "BM", "SPLIT", "K"], do_bench=_quick_bench)
@triton.jit
def bank_expand_kernel(
    h_ptr, b_ptr, base_ptr, out_ptr, ids_ptr, seq_ptr, ranks_ptr,
    T, DO, LR, TB,
    sbl, sbr, sbd, sbt, sbo, sot, sod,
    R: tl.constexpr, K: tl.constexpr, SPLIT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    BK: tl.constexpr, SEQ: tl.constexpr, SKIP: tl.constexpr, ONE_WINDOW: tl.constexpr, F32: tl.constexpr,
):  # fmt: skip
    """out[t, tile] = base[t, tile] + (sum over splits of h[s, t, :]) @ B_cat[:, tile]. Grid: (cdiv(T, BM), cdiv(DO, BN)).

    A GEMM over the bank's L*R columns: h already holds the routing coefficients. Rows of B past an adapter's
    rank, and rows of the adapters no token of the row tile routes to, are masked (never read): h is zero there,
    and a zero times a NaN or Inf in B would still be NaN. The routed adapters of the tile are a 64-bit set
    (``_routed_bits``), built once per program when the bank has at most 64 adapters (ONE_WINDOW), else per chunk
    for the 64 adapters from the chunk's first (a chunk of BK <= 64 columns spans at most 64 adapters). With SKIP
    the chunks no row of the tile routes to are skipped (a decode step reads only its routed adapters' B); the
    shrink's column tile is a multiple of BK, so a chunk read was written.
    """
    tl.static_assert(BK <= 64)
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    rm = rows < T
    r64 = rows.to(tl.int64)
    route = _route_row(seq_ptr, rows, rm, SEQ)
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    nm = cols < DO
    m2 = rm[:, None] & nm[None, :]
    acc = tl.load(base_ptr + r64[:, None] * sbt + cols[None, :] * sbo, mask=m2, other=0.0).to(tl.float32)
    if ONE_WINDOW:
        bits = _routed_bits(ids_ptr, route, rm, 0, K)
    for j0 in range(0, LR, BK):
        first = j0 // R  # the chunk's adapters: first .. first + span
        if ONE_WINDOW:
            window = bits >> first.to(tl.uint64)
        else:
            window = _routed_bits(ids_ptr, route, rm, first, K)
        span = ((j0 + BK - 1) // R - first).to(tl.uint64)  # < 64
        window &= (tl.full((), 2, tl.uint64) << span) - 1  # the routed ones among them, as bits from ``first``
        if not SKIP or window != 0:
            jj, a, c, jm, cm = _bank_columns(ranks_ptr, j0, LR, BK, R)
            live = ((window >> (a - first).to(tl.uint64)) & 1) != 0  # routed by some row of the tile
            u = tl.zeros((BM, BK), dtype=tl.float32)
            for s in tl.static_range(SPLIT):
                u += tl.load(h_ptr + (s * T + r64)[:, None] * LR + jj[None, :],
                             mask=rm[:, None] & jm[None, :], other=0.0).to(tl.float32)  # fmt: skip
            wt = tl.load(b_ptr + a.to(tl.int64)[:, None] * sbl + c[:, None] * sbr + cols[None, :] * sbd,
                         mask=(cm & live)[:, None] & nm[None, :], other=0.0)  # fmt: skip
            acc = _mma(acc, u, wt, F32)
    tl.store(out_ptr + r64[:, None] * sot + cols[None, :] * sod, acc.to(out_ptr.dtype.element_ty), mask=m2)
