"""Triton kernels of the multi-LoRA op (imported lazily: TRITON_INTERPRET is read when they are decorated).

Vocabulary. A *pair* n = t * K + k is one routing slot of one token. Pairs are sorted by a *group* key
g = k * (L + 1) + a (slot-major, then adapter; a = L means "empty slot or rank-0 adapter"), so each group is a
contiguous run of rows in sorted order and ``off[g] .. off[g + 1]`` are its rows. A *block* is BM consecutive rows of
one group; every kernel over blocks finds its group from ``off`` alone (``_locate_block``), so the launch grid has
the static size ``cdiv(N, BM) + G`` and nothing is read back to the host.

Kernels, each a tensor-core GEMM over gathered rows with fp32 accumulation:
  grouped_shrink   u[row]  = X[t(row)] @ W[a]              (forward x @ A; backward g @ B^T)
  grouped_expand   out[t]  = src[t] + c[row] * u[row] @ W[a] for the rows of slot k only (one launch per slot, so
                   no two programs touch one token and no [T*K, d_out] intermediate exists)
  grouped_wgrad    dW[a]   = sum_rows X[t(row)]^T (c[row] * u[row])   (dA with X = x; dB^T with X = grad)
  token_fused      the decode path for T <= FUSED_T_MAX: one launch, no sorting; each program recomputes its
                   tokens' x @ A on CUDA cores and adds h @ B[a] for its d_out tile.
  token_shrink / token_expand   the small-T path above that: no sorting, split-K over d_in then a CUDA-core
                   expand; two launches in total.
The token kernels take sentence routing as it is (ids/weights [S, K] and seq_ids [T], flag SEQ): nothing is gathered.
c[row] = scales[a] * weights[n] is applied on load, so ``u`` is the raw x @ A (needed again for dB and dw).
"""

import os

import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _configs(names, values, interpret):
    """Autotuning space on the GPU; one small config under the interpreter (where tuning would only cost time)."""
    if _INTERPRET:
        return [triton.Config(dict(zip(names, interpret)), num_warps=4)]
    return [triton.Config(dict(zip(names, v[:-2])), num_warps=v[-2], num_stages=v[-1]) for v in values]


def _quick_bench(kernel_call, quantiles):
    """Autotuning timer: short warm-up and repeats (tuning runs once per shape key, at the first call)."""
    return triton.testing.do_bench(kernel_call, warmup=5, rep=20, quantiles=quantiles)


# (tile sizes..., num_warps, num_stages)
SHRINK_CONFIGS = _configs(
    ("BM", "BK"),
    [(64, 64, 4, 3), (64, 128, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 5), (32, 128, 4, 4)],
    (16, 16),
)
EXPAND_CONFIGS = _configs(
    ("BM", "BN"),
    [(64, 128, 4, 2), (64, 256, 8, 2), (128, 128, 8, 2), (32, 128, 4, 2), (128, 256, 8, 2), (64, 64, 4, 2)],
    (16, 32),
)
WGRAD_CONFIGS = _configs(
    ("BM", "BD"),
    [(64, 64, 4, 3), (64, 128, 8, 3), (128, 64, 4, 3), (32, 128, 4, 3), (128, 128, 8, 3)],
    (16, 16),
)


@triton.jit
def routing_keys_kernel(ids_ptr, ranks_ptr, key_ptr, N, L, K: tl.constexpr, BLOCK: tl.constexpr):
    """key[n] = k * (L + 1) + a, with a = L for empty slots (-1), out-of-range ids and rank-0 adapters."""
    n = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = n < N
    a = tl.load(ids_ptr + n, mask=m, other=-1).to(tl.int32)
    valid = (a >= 0) & (a < L)
    r = tl.load(ranks_ptr + a, mask=m & valid, other=0)
    a = tl.where(valid & (r > 0), a, L)
    tl.store(key_ptr + n, (n % K) * (L + 1) + a, mask=m)


@triton.jit
def _locate_block(off_ptr, b, G, BM: tl.constexpr, GP: tl.constexpr):
    """Block b -> (group g, first row, end row of the group); g >= G means the block is past the last one."""
    gi = tl.arange(0, GP)
    gm = gi < G
    lo = tl.load(off_ptr + gi, mask=gm, other=0)
    hi = tl.load(off_ptr + gi + 1, mask=gm, other=0)
    nblk = (hi - lo + BM - 1) // BM
    blk_end = tl.cumsum(nblk, 0)
    g = tl.sum((blk_end <= b).to(tl.int32), 0)
    sel = gi == g
    first_blk = tl.sum(tl.where(sel, blk_end - nblk, 0), 0)
    seg_lo = tl.sum(tl.where(sel, lo, 0), 0)
    seg_hi = tl.sum(tl.where(sel, hi, 0), 0)
    return g, seg_lo + (b - first_blk) * BM, seg_hi


@triton.jit
def _mma(acc, p, q, F32: tl.constexpr):
    """acc += p @ q: exact fp32 products (ieee) for fp32 data or the interpreter, else tensor cores in q's dtype."""
    if F32:
        return tl.dot(p.to(tl.float32), q.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(p.to(q.dtype), q, acc)


@triton.autotune(SHRINK_CONFIGS, key=["D", "NB", "BR", "K"], reset_to_zero=["u_ptr"], do_bench=_quick_bench)
@triton.jit
def grouped_shrink_kernel(
    x_ptr, w_ptr, perm_ptr, off_ptr, ranks_ptr, u_ptr,
    D, G, L, NB,
    sxt, sxd, swl, swd, swr, CHUNK,
    K: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr, GP: tl.constexpr,
    F32: tl.constexpr, ATOMIC: tl.constexpr,
):  # fmt: skip
    """u[rows, :BR] = X[t(rows)] @ W[a][:, :r_a] (columns past r_a are 0). Grid: (blocks, splits of D).

    With several splits (ATOMIC) each program reduces CHUNK of D and adds its part into a zeroed u: a block of rows
    alone is too little work in flight to stream x at full bandwidth.
    """
    g, row0, row_end = _locate_block(off_ptr, tl.program_id(0), G, BM, GP)
    a = g % (L + 1)
    if (g < G) & (a < L):
        rows = row0 + tl.arange(0, BM)
        rm = rows < row_end
        t = tl.load(perm_ptr + rows, mask=rm, other=0) // K
        rr = tl.arange(0, BR)
        cm = rr < tl.load(ranks_ptr + a)
        acc = tl.zeros((BM, BR), dtype=tl.float32)
        x_row = x_ptr + t.to(tl.int64)[:, None] * sxt
        w_base = w_ptr + a.to(tl.int64) * swl + rr[None, :] * swr
        d_lo = tl.program_id(1) * CHUNK
        d_hi = tl.minimum(d_lo + CHUNK, D)
        for d0 in range(d_lo, d_hi, BK):
            dd = d0 + tl.arange(0, BK)
            dm = dd < d_hi
            xt = tl.load(x_row + dd[None, :] * sxd, mask=rm[:, None] & dm[None, :], other=0.0)
            wt = tl.load(w_base + dd[:, None] * swd, mask=dm[:, None] & cm[None, :], other=0.0)
            acc = _mma(acc, xt, wt, F32)
        if ATOMIC:
            tl.atomic_add(u_ptr + rows[:, None] * BR + rr[None, :], acc, mask=rm[:, None], sem="relaxed")
        else:
            tl.store(u_ptr + rows[:, None] * BR + rr[None, :], acc, mask=rm[:, None])


@triton.autotune(
    EXPAND_CONFIGS, key=["DO", "NB", "BR", "K"], restore_value=["out_ptr"], do_bench=_quick_bench
)
@triton.jit
def grouped_expand_kernel(
    u_ptr, w_ptr, src_ptr, out_ptr, perm_ptr, off_ptr, ranks_ptr, scales_ptr, gate_ptr,
    DO, G, L, NB, slot,
    swl, swr, swd, sst, ssd, sot, sod,
    K: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BR: tl.constexpr, GP: tl.constexpr,
    F32: tl.constexpr, ZERO_SRC: tl.constexpr,
):  # fmt: skip
    """For the rows of slot ``slot``: out[t] = src[t] + c * u @ W[a][:r_a]. Grid: (blocks, cdiv(DO, BN)).

    ``off_ptr`` holds slot ``slot``'s G = L + 1 group offsets alone (group g = adapter g, g = L the empty slots), so
    the scan in ``_locate_block`` and the grid do not grow with K. Slot 0 also covers its empty group (out = src),
    so after slot 0 every token's row is written once.
    """
    g, row0, row_end = _locate_block(off_ptr, tl.program_id(0), G, BM, GP)
    a = g
    if (g < G) & ((a < L) | (slot == 0)):
        rows = row0 + tl.arange(0, BM)
        rm = rows < row_end
        n = tl.load(perm_ptr + rows, mask=rm, other=0)
        t = (n // K).to(tl.int64)
        cols = tl.program_id(1) * BN + tl.arange(0, BN)
        nm = cols < DO
        m2 = rm[:, None] & nm[None, :]
        if ZERO_SRC:
            acc = tl.zeros((BM, BN), dtype=tl.float32)
        else:
            acc = tl.load(src_ptr + t[:, None] * sst + cols[None, :] * ssd, mask=m2, other=0.0).to(tl.float32)
        if a < L:
            rr = tl.arange(0, BR)
            coef = tl.load(scales_ptr + a).to(tl.float32) * tl.load(gate_ptr + n, mask=rm, other=0.0).to(
                tl.float32
            )
            h = tl.load(u_ptr + rows[:, None] * BR + rr[None, :], mask=rm[:, None], other=0.0) * coef[:, None]
            wm = (rr < tl.load(ranks_ptr + a))[:, None] & nm[None, :]
            wt = tl.load(
                w_ptr + a.to(tl.int64) * swl + rr[:, None] * swr + cols[None, :] * swd, mask=wm, other=0.0
            )
            acc = _mma(acc, h, wt, F32)
        tl.store(out_ptr + t[:, None] * sot + cols[None, :] * sod, acc.to(out_ptr.dtype.element_ty), mask=m2)


@triton.autotune(WGRAD_CONFIGS, key=["D", "NB", "BR", "K"], do_bench=_quick_bench)
@triton.jit
def grouped_wgrad_kernel(
    x_ptr, u_ptr, perm_ptr, off_ptr, ranks_ptr, scales_ptr, gate_ptr, dw_ptr,
    D, L, R, NB,
    sxt, sxd, sdl, sdd, sdr,
    K: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr, BR: tl.constexpr, F32: tl.constexpr,
):  # fmt: skip
    """dW[a, d, r] = sum over a's rows (all slots) of X[t, d] * c * u[row, r], zero past r_a. Grid: (L, cdiv(D, BD))."""
    a = tl.program_id(0)
    dd = tl.program_id(1) * BD + tl.arange(0, BD)
    dm = dd < D
    rr = tl.arange(0, BR)
    r_a = tl.load(ranks_ptr + a)
    s_a = tl.load(scales_ptr + a).to(tl.float32)
    acc = tl.zeros((BD, BR), dtype=tl.float32)
    for k in range(K):
        lo = tl.load(off_ptr + k * (L + 1) + a)
        hi = tl.load(off_ptr + k * (L + 1) + a + 1)
        for r0 in range(lo, hi, BM):
            rows = r0 + tl.arange(0, BM)
            rm = rows < hi
            n = tl.load(perm_ptr + rows, mask=rm, other=0)
            t = (n // K).to(tl.int64)
            xt = tl.load(
                x_ptr + t[None, :] * sxt + dd[:, None] * sxd, mask=dm[:, None] & rm[None, :], other=0.0
            )
            coef = s_a * tl.load(gate_ptr + n, mask=rm, other=0.0).to(tl.float32)
            h = tl.load(u_ptr + rows[:, None] * BR + rr[None, :], mask=rm[:, None], other=0.0) * coef[:, None]
            if F32:
                acc = tl.dot(xt.to(tl.float32), h, acc, input_precision="ieee")
            else:
                acc = tl.dot(xt, h.to(xt.dtype), acc)
    acc = tl.where((rr < r_a)[None, :], acc, 0.0)
    ptrs = dw_ptr + a.to(tl.int64) * sdl + dd[:, None] * sdd + rr[None, :] * sdr
    tl.store(ptrs, acc.to(dw_ptr.dtype.element_ty), mask=dm[:, None] & (rr < R)[None, :])


@triton.jit
def _route_row(seq_ptr, t, tv, SEQ: tl.constexpr):
    """Row of ids/weights that token t reads: seq_ids[t] for sentence routing (SEQ), else t itself."""
    if SEQ:
        row = tl.load(seq_ptr + t, mask=tv, other=0).to(tl.int64)
    else:
        row = t.to(tl.int64)
    return row


@triton.jit
def _slot(ids_ptr, ranks_ptr, i, iv, L):
    """(adapter, rank) of routing slot i; an empty slot (-1), an id out of [0, L) or a masked-off i gives (0, 0)."""
    a = tl.load(ids_ptr + i, mask=iv, other=-1).to(tl.int32)
    valid = (a >= 0) & (a < L)
    a = tl.where(valid, a, 0)
    return a, tl.where(valid, tl.load(ranks_ptr + a), 0)


@triton.jit
def token_shrink_kernel(
    x_ptr, w_ptr, ids_ptr, seq_ptr, ranks_ptr, part_ptr,
    N, D, L, CHUNK,
    sxt, sxd, swl, swd, swr,
    K: tl.constexpr, SPLIT: tl.constexpr, PP: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr,
    SEQ: tl.constexpr,
):  # fmt: skip
    """part[n, s, :] = x[t, chunk s] @ A[a][chunk s, :r_a] for PP pairs n. Grid: (cdiv(N, PP), SPLIT). Decode path.

    PP pairs a program (1 on the GPU: measured, 4 made T = 1 and T = 64 slower, each extra pair being a serial chain
    of dependent loads; the interpreter uses 2 so that the loop and its tail mask are tested).
    """
    s = tl.program_id(1)
    rr = tl.arange(0, BR)
    d_lo = s * CHUNK
    for i in range(PP):
        n = tl.program_id(0) * PP + i
        nv = n < N
        t = n // K
        a, r_a = _slot(ids_ptr, ranks_ptr, _route_row(seq_ptr, t, nv, SEQ) * K + n % K, nv, L)
        t = t.to(tl.int64)
        cm = rr < r_a
        acc = tl.zeros((BR,), dtype=tl.float32)
        for d0 in range(d_lo, d_lo + CHUNK, BK):
            dd = d0 + tl.arange(0, BK)
            dm = (dd < D) & (dd < d_lo + CHUNK) & nv
            xv = tl.load(x_ptr + t * sxt + dd * sxd, mask=dm, other=0.0).to(tl.float32)
            wt = tl.load(w_ptr + a.to(tl.int64) * swl + dd[:, None] * swd + rr[None, :] * swr,
                         mask=dm[:, None] & cm[None, :], other=0.0).to(tl.float32)  # fmt: skip
            acc += tl.sum(xv[:, None] * wt, 0)
        tl.store(part_ptr + (n * SPLIT + s) * BR + rr, acc, mask=nv & (rr < BR))


@triton.jit
def token_expand_kernel(
    part_ptr, w_ptr, base_ptr, out_ptr, ids_ptr, seq_ptr, ranks_ptr, scales_ptr, gate_ptr,
    T, DO, L,
    swl, swr, swd, sbt, sbd, sot, sod,
    K: tl.constexpr, SPLIT: tl.constexpr, SP: tl.constexpr, TT: tl.constexpr, BN: tl.constexpr, BR: tl.constexpr,
    SEQ: tl.constexpr,
):  # fmt: skip
    """out[t, tile] = base[t, tile] + sum_k c * (sum_s part[n, s]) @ B[a][:r_a, tile] for TT tokens.

    Grid: (cdiv(DO, BN), cdiv(T, TT)).
    """
    cols = tl.program_id(0) * BN + tl.arange(0, BN)
    nm = cols < DO
    rr = tl.arange(0, BR)
    ss = tl.arange(0, SP)
    for i in range(TT):
        t = tl.program_id(1) * TT + i
        tv = t < T
        row = _route_row(seq_ptr, t, tv, SEQ)
        acc = tl.load(base_ptr + t.to(tl.int64) * sbt + cols * sbd, mask=nm & tv, other=0.0).to(tl.float32)
        for k in tl.static_range(K):
            n = t * K + k
            a, r_a = _slot(ids_ptr, ranks_ptr, row * K + k, tv, L)
            coef = tl.load(scales_ptr + a).to(tl.float32) * tl.load(gate_ptr + row * K + k, mask=tv, other=0.0).to(
                tl.float32
            )
            coef = tl.where(r_a > 0, coef, 0.0)  # an empty slot's weight (and adapter 0's scale) stay out
            pm = (ss < SPLIT)[:, None] & (rr < r_a)[None, :]
            parts = tl.load(part_ptr + (n * SPLIT + ss[:, None]) * BR + rr[None, :], mask=pm, other=0.0)
            h = tl.sum(parts, 0) * coef
            wt = tl.load(w_ptr + a.to(tl.int64) * swl + rr[:, None] * swr + cols[None, :] * swd,
                         mask=(rr < r_a)[:, None] & nm[None, :], other=0.0).to(tl.float32)  # fmt: skip
            acc += tl.sum(h[:, None] * wt, 0)
        tl.store(out_ptr + t.to(tl.int64) * sot + cols * sod, acc.to(out_ptr.dtype.element_ty), mask=nm & tv)


@triton.jit
def token_fused_kernel(
    x_ptr, a_ptr, b_ptr, base_ptr, out_ptr, ids_ptr, seq_ptr, ranks_ptr, scales_ptr, gate_ptr,
    T, D, DO, L,
    sxt, sxd, sal, sad, sar, sbl, sbr, sbd, sbt, sbo, sot, sod,
    K: tl.constexpr, TT: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr, BR: tl.constexpr, SEQ: tl.constexpr,
):  # fmt: skip
    """The one-launch decode path: out[t, tile] = base[t, tile] + sum_k c * (x[t] @ A[a][:, :r_a]) @ B[a][:r_a, tile].

    Grid: (cdiv(DO, BN), cdiv(T, TT)). Every program recomputes its tokens' tiny h = x[t] @ A[a] (D x r_a
    multiply-adds, A[a] read from L2 by the cdiv(DO, BN) programs of a token) instead of handing it to a second
    launch through global memory: at decode the launch costs more than the recomputation. Empty slots and rank-0
    adapters skip both products.
    """
    cols = tl.program_id(0) * BN + tl.arange(0, BN)
    nm = cols < DO
    rr = tl.arange(0, BR)
    for i in range(TT):
        t = tl.program_id(1) * TT + i
        tv = t < T
        row = _route_row(seq_ptr, t, tv, SEQ)
        t64 = t.to(tl.int64)
        acc = tl.load(base_ptr + t64 * sbt + cols * sbo, mask=nm & tv, other=0.0).to(tl.float32)
        for k in tl.static_range(K):
            a, r_a = _slot(ids_ptr, ranks_ptr, row * K + k, tv, L)
            if r_a > 0:
                cm = rr < r_a
                a64 = a.to(tl.int64)
                h = tl.zeros((BR,), dtype=tl.float32)
                for d0 in range(0, D, BK):
                    dd = d0 + tl.arange(0, BK)
                    dm = dd < D
                    xv = tl.load(x_ptr + t64 * sxt + dd * sxd, mask=dm, other=0.0).to(tl.float32)
                    wt = tl.load(a_ptr + a64 * sal + dd[:, None] * sad + rr[None, :] * sar,
                                 mask=dm[:, None] & cm[None, :], other=0.0).to(tl.float32)  # fmt: skip
                    h += tl.sum(xv[:, None] * wt, 0)
                coef = tl.load(scales_ptr + a).to(tl.float32) * tl.load(gate_ptr + row * K + k).to(tl.float32)
                wt = tl.load(b_ptr + a64 * sbl + rr[:, None] * sbr + cols[None, :] * sbd,
                             mask=cm[:, None] & nm[None, :], other=0.0).to(tl.float32)  # fmt: skip
                acc += tl.sum((h * coef)[:, None] * wt, 0)
        tl.store(out_ptr + t64 * sot + cols * sod, acc.to(out_ptr.dtype.element_ty), mask=nm & tv)
