"""Triton kernel of ``kernels.shrunk_expand``: route and expand over a precomputed shrink, one launch.

Imported lazily (TRITON_INTERPRET is read when the kernel is decorated). Grid (cdiv(T, BT), cdiv(N, BN)): a
program takes BT tokens (``block_t``; 1 by default) of one block of BN output columns, one after another in
straight-line code (a token past T re-reads the last one and stores nothing, so the tokens' loads are
independent), and for each token t

  1. loads y[t, block] (fp32 accumulator) and each column's member m(c) from ``col_member`` (a block may straddle
     members: every gather below is per column);
  2. finds the routing: ids/weights row ``seq_ids[t]`` (SEQ) or t, the same for every member; or (LOGITS) the
     top-k of logits[t, m, :L] by k passes of max / lowest argmax, and the softmax of the kept logits /
     temperature (``_top_k``). Where no block crosses a member (``ONE_MEMBER``: each member's width a multiple
     of BN, as LLaMA's are; the caller knows it from ``col_member``), that is done once per block over the
     member's row (``_top_k_row``, a 1-D [LP] tile), and every column then shares each slot's adapter, so B's
     rows load as contiguous vectors as in SEQ mode; otherwise per column, over a [BN, LP] tile, with per-column
     gathers. (A [members, LP] tile mapped to columns afterwards trips Triton 3.6's GPU compiler -- "operand does
     not dominate this use" -- at small L and rank 8.) A compile-time choice: a run-time branch between the two
     costs the one-member path the other's registers (63 against 29 at rank 8, BN 32, sm_90).
  3. per slot k: the column's adapter a_c and weight w_c, then gathers h[t, m(c), a_c, :R] and B[a_c, :R, c] as
     [BR, BN] tiles and adds sum_j (w_c h) * B (CUDA cores, fp32), a product taken only where w_c h != 0;
  4. stores y + delta once (in place when out is y: the program reads its own columns before it writes them).

What is read: per (token, column) the K routed adapters' h (L1 hits: a member's columns share them) and B column;
nothing of an unrouted adapter. Masked loads (empty slot, id outside [0, L), untouched member, rank past R) read
nothing, and the ``!= 0`` select keeps a NaN / Inf row of B behind a zero h (rank padding) out of the sum. No value
goes back to the host and the grid depends on shapes alone: a CUDA graph holds it.
"""

import triton
import triton.language as tl


@triton.jit
def _top_k(lg_ptr, t, slt, slm, sla, L, m_c, cv, inv_temp,
           BN: tl.constexpr, LP: tl.constexpr, KP: tl.constexpr, TOPK: tl.constexpr):  # fmt: skip
    """Each column's top-TOPK adapters of logits[t, m(c), :L] and their softmax weights: ([BN, KP] int32 ids,
    [BN, KP] fp32 weights); slot i is the i-th largest (ties: the lowest index, as torch.topk on distinct values).
    Columns past N (and a NaN logit's missing winner) get the id LP, which no load reads. The [BN, LP] tile reads
    a member's logits once per column: L1 hits, a few KB per program."""
    aa = tl.arange(0, LP)
    kk = tl.arange(0, KP)
    avail = cv[:, None] & (aa < L)[None, :]
    v = tl.load(lg_ptr + t * slt + m_c[:, None].to(tl.int64) * slm + aa[None, :] * sla, mask=avail,
                other=0.0).to(tl.float32)  # fmt: skip
    top_v = tl.full((BN, KP), float("-inf"), tl.float32)
    top_a = tl.full((BN, KP), LP, tl.int32)
    for i in tl.static_range(TOPK):
        mx = tl.max(tl.where(avail, v, float("-inf")), 1)
        idx = tl.min(tl.where(avail & (v == mx[:, None]), aa[None, :], LP), 1)
        avail = avail & (aa[None, :] != idx[:, None])  # taken (an -inf logit cannot be picked twice)
        top_v = tl.where(kk[None, :] == i, mx[:, None], top_v)
        top_a = tl.where(kk[None, :] == i, idx[:, None], top_a)
    first = tl.max(top_v, 1)  # slot 0: the largest
    e = tl.where(kk[None, :] < TOPK, tl.exp((top_v - first[:, None]) * inv_temp), 0.0)
    return top_a, e / tl.sum(e, 1)[:, None]


@triton.jit
def _top_k_row(lg_ptr, t, slt, slm, sla, L, m, inv_temp, LP: tl.constexpr, KP: tl.constexpr, TOPK: tl.constexpr):
    """``_top_k`` of one member's row logits[t, m, :L]: ([KP] int32 ids, [KP] fp32 weights), the same rules (ties:
    the lowest index; a NaN's missing winner: id LP) on a 1-D tile, for a block whose columns share the member.
    Its own function, not ``_top_k`` at BN = 1: that [1, LP] form compiled to 62 registers, this to 29 (rank 8,
    BN 32, sm_90)."""
    aa = tl.arange(0, LP)
    kk = tl.arange(0, KP)
    avail = aa < L
    v = tl.load(lg_ptr + t * slt + m.to(tl.int64) * slm + aa * sla, mask=avail, other=0.0).to(tl.float32)
    top_v = tl.full((KP,), float("-inf"), tl.float32)
    top_a = tl.full((KP,), LP, tl.int32)
    for i in tl.static_range(TOPK):
        mx = tl.max(tl.where(avail, v, float("-inf")), 0)
        idx = tl.min(tl.where(avail & (v == mx), aa, LP), 0)
        avail = avail & (aa != idx)
        top_v = tl.where(kk == i, mx, top_v)
        top_a = tl.where(kk == i, idx, top_a)
    e = tl.where(kk < TOPK, tl.exp((top_v - tl.max(top_v, 0)) * inv_temp), 0.0)
    return top_a, e / tl.sum(e, 0)


@triton.jit
def _add_slot(acc, h_tok, b_ptr, a_c, w_c, rr, rv, cols, cv, L, sha, sbl, sbr, sbc):
    """acc + w_c * h[t, m(c), a_c, :] @ B[a_c, :, c] for one slot ([BN] adapters and weights, one per column); an
    id outside [0, L) reads nothing and adds nothing."""
    ok = cv & (a_c >= 0) & (a_c < L)
    a64 = tl.where(ok, a_c, 0).to(tl.int64)
    w_c = tl.where(ok, w_c, 0.0)  # an empty slot's weight (NaN, even) stays out
    m2 = rv[:, None] & ok[None, :]
    hv = tl.load(h_tok + a64[None, :] * sha, mask=m2, other=0.0).to(tl.float32)
    bv = tl.load(b_ptr + a64[None, :] * sbl + rr[:, None] * sbr + cols[None, :] * sbc, mask=m2,
                 other=0.0).to(tl.float32)  # fmt: skip
    c = hv * w_c[None, :]
    return acc + tl.sum(tl.where(c != 0.0, c * bv, 0.0), 0)


@triton.jit
def _token(t, sv, y_ptr, h_ptr, b_ptr, cm_ptr, out_ptr, ids_ptr, w_ptr, seq_ptr, lg_ptr, L, inv_temp, cols, cv, m_c,
           rr, rv, syt, syc, sht, shm, sha, shr, sbl, sbr, sbc, sot, soc, sis, sik, sws, swk, slt, slm, sla,
           K: tl.constexpr, BN: tl.constexpr, SEQ: tl.constexpr, LOGITS: tl.constexpr, LP: tl.constexpr,
           KP: tl.constexpr, ONE_MEMBER: tl.constexpr):  # fmt: skip
    """Token t's BN output columns: route, expand, store where ``sv`` (steps 1-4 above)."""
    acc = tl.load(y_ptr + t * syt + cols * syc, mask=cv, other=0.0).to(tl.float32)
    if LOGITS:
        kk = tl.arange(0, KP)
        if ONE_MEMBER:
            # every block lies in one member (each member's width a multiple of BN, as LLaMA's are): one top-k for
            # the block and each slot's adapter the same in every column, so B's rows load as contiguous vectors
            m0 = tl.load(cm_ptr + tl.program_id(1) * BN).to(tl.int32)  # the block's first column (< N)
            one_a, one_w = _top_k_row(lg_ptr, t, slt, slm, sla, L, m0, inv_temp, LP, KP, K)
            h_one = h_ptr + t * sht + m0.to(tl.int64) * shm + rr[:, None] * shr
            for k in tl.static_range(K):
                a = tl.sum(tl.where(kk == k, one_a, 0), 0)
                w = tl.sum(tl.where(kk == k, one_w, 0.0), 0)
                acc = _add_slot(acc, h_one, b_ptr, tl.full((BN,), 0, tl.int32) + a,
                                tl.full((BN,), 0.0, tl.float32) + w, rr, rv, cols, cv, L, sha, sbl, sbr, sbc)
        else:  # blocks may cross members: each column's own top-k
            top_a, top_w = _top_k(lg_ptr, t, slt, slm, sla, L, m_c, cv, inv_temp, BN, LP, KP, K)
            h_tok = h_ptr + t * sht + m_c[None, :].to(tl.int64) * shm + rr[:, None] * shr
            for k in tl.static_range(K):
                a_c = tl.sum(tl.where(kk[None, :] == k, top_a, 0), 1)  # slot k of each column's own top-k
                w_c = tl.sum(tl.where(kk[None, :] == k, top_w, 0.0), 1)
                acc = _add_slot(acc, h_tok, b_ptr, a_c, w_c, rr, rv, cols, cv, L, sha, sbl, sbr, sbc)
    else:
        row = tl.load(seq_ptr + t).to(tl.int64) if SEQ else t
        h_tok = h_ptr + t * sht + m_c[None, :].to(tl.int64) * shm + rr[:, None] * shr
        for k in tl.static_range(K):
            a_c = tl.full((BN,), 0, tl.int32) + tl.load(ids_ptr + row * sis + k * sik).to(tl.int32)
            w_c = tl.full((BN,), 0.0, tl.float32) + tl.load(w_ptr + row * sws + k * swk).to(tl.float32)
            acc = _add_slot(acc, h_tok, b_ptr, a_c, w_c, rr, rv, cols, cv, L, sha, sbl, sbr, sbc)
    tl.store(out_ptr + t * sot + cols * soc, acc.to(out_ptr.dtype.element_ty), mask=sv)


@triton.jit
def shrunk_expand_kernel(
    y_ptr, h_ptr, b_ptr, cm_ptr, out_ptr, ids_ptr, w_ptr, seq_ptr, lg_ptr,
    T, N, L, inv_temp,
    syt, syc, sht, shm, sha, shr, sbl, sbr, sbc, sot, soc, sis, sik, sws, swk, slt, slm, sla,
    R: tl.constexpr, BR: tl.constexpr, K: tl.constexpr, BN: tl.constexpr, SEQ: tl.constexpr,
    LOGITS: tl.constexpr, LP: tl.constexpr, KP: tl.constexpr, ONE_MEMBER: tl.constexpr = False,
    BT: tl.constexpr = 1,
):  # fmt: skip
    """out[t, c] = y[t, c] + sum_k w_k sum_{j<R} h[t, m(c), a_k, j] * B[a_k, j, c]. Grid (cdiv(T, BT), cdiv(N, BN)):
    a program takes BT tokens (unrolled, independent) of one block of columns."""
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    cv = cols < N
    m_c = tl.load(cm_ptr + cols, mask=cv, other=0).to(tl.int32)
    rr = tl.arange(0, BR)
    rv = rr < R
    for i in tl.static_range(BT):
        # straight-line code, no branch: a token past T repeats the last one's loads and stores nothing, so the
        # BT tokens' loads are independent and can be in flight together
        t = tl.program_id(0).to(tl.int64) * BT + i
        _token(tl.minimum(t, T - 1), cv & (t < T), y_ptr, h_ptr, b_ptr, cm_ptr, out_ptr, ids_ptr, w_ptr, seq_ptr,
               lg_ptr, L, inv_temp, cols, cv, m_c, rr, rv, syt, syc, sht, shm, sha, shr, sbl, sbr, sbc, sot, soc, sis,
               sik, sws, swk, slt, slm, sla, K, BN, SEQ, LOGITS, LP, KP, ONE_MEMBER)  # fmt: skip


def launch(y, h, B, col_member, out, ids, weights, seq_ids, logits, top_k, temperature, block_n, one_member=False,
           block_t=1):
    """One ``shrunk_expand_kernel`` launch writing ``out``; the caller has checked shapes (``shrunk_expand``).
    ``one_member``: no block of ``block_n`` columns crosses a member boundary (the logits mode then routes once
    per block). ``block_t``: tokens per program."""
    T, N = y.shape
    L, R = h.shape[2:]
    if T == 0 or N == 0:
        return out
    mode = logits is not None
    K = top_k if mode else ids.shape[1]
    any_t = col_member  # a placeholder pointer where a mode's tensor is absent (never read)
    ids_t, w_t = (any_t, any_t) if mode else (ids, weights)
    ids_s = (0, 0) if mode else (ids.stride(0), ids.stride(1))
    w_s = (0, 0) if mode else (weights.stride(0), weights.stride(1))
    lg_s = logits.stride() if mode else (0, 0, 0)
    if K == 0:
        return out.copy_(y) if out is not y else out
    shrunk_expand_kernel[(triton.cdiv(T, block_t), triton.cdiv(N, block_n))](
        y, h, B, col_member, out, ids_t, w_t, seq_ids if seq_ids is not None else any_t,
        logits if mode else any_t, T, N, L, 1.0 / temperature,
        y.stride(0), y.stride(1), *h.stride(), *B.stride(), out.stride(0), out.stride(1), *ids_s, *w_s, *lg_s,
        R=R, BR=triton.next_power_of_2(max(R, 1)), K=K, BN=block_n, SEQ=seq_ids is not None, LOGITS=mode,
        LP=triton.next_power_of_2(L), KP=triton.next_power_of_2(max(K, 1)), ONE_MEMBER=bool(one_member and mode),
        BT=block_t,
        num_warps=4,
    )  # fmt: skip
    return out
