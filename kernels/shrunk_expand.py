"""The decode epilogue of a grouped projection: route, then expand over a shrink the base GEMM already computed.

At decode (a few tokens a call) a multi-LoRA projection is bound by launches, not bytes. A projection group (q/k/v,
or gate/up: members that read the same x) can run ONE GEMM with a packed weight whose extra rows hold every
adapter's shrink A^T (and, for MeteoRA, the gates), so that GEMM's output holds, per token t,

    y[t, :N]                the members' base outputs, side by side (N = sum of the members' d_out)
    h[t, m, a, :R]          x_t @ A_m[a] for every member m and adapter a (R: the widest rank, padded; 0 past a rank)
    logits[t, m, :L]        MeteoRA's gate logits per member (optional)

and this op is the one launch after it:

    out[t, c] = y[t, c] + sum_k w_k * h[t, m, a_k, :] @ B[a_k, :, c],    m = col_member[c]

with ``B[a, :, c]`` member m's ``scale * B_m[a]`` (``B`` is [L, R, N]: each member's adapters in its columns). The
route is either given (``ids``/``weights`` [S, K], the same for every member; ``seq_ids`` [T] maps a token to its
sequence's row: DLP's sentence routing) or chosen here from ``logits`` (per token and member, the ``top_k`` largest,
weights = softmax(top-k logits / temperature): MeteoRA). Replaces the gate GEMM, top-k, softmax, routing offsets,
shrink and expand launches of each group (about ten) by one.

Reads: y and the routed adapters' h and B columns only (h of every adapter comes from the GEMM for free; B of an
unrouted adapter is never touched). y, h and logits may be strided views of that one wide GEMM output (pass it
sliced, nothing is copied). Nothing is read back to the host: a CUDA graph captures the Triton path.

NaN safety, per token: an unrouted adapter's h or B, an empty slot (id -1, any id outside [0, L)) and its weight,
and B's rows behind a zero h (rank padding: the GEMM's zero A rows make h exactly 0 there) never reach the output;
a product is taken only where ``w * h != 0``. Inference only: no autograd (an input that requires grad under grad
mode is refused).

Backends: ``triton`` (``kernels.triton_shrunk_expand``; CUDA, or CPU under TRITON_INTERPRET=1), ``torch`` (the
vectorised gathers below: the CPU path and the fallback), ``auto`` = triton on CUDA, torch elsewhere.
"""

from __future__ import annotations

import torch

from kernels import switches
from kernels.derived_cache import kept_when_frozen
from kernels.reference import check_ids

BACKENDS = ("auto", "triton", "torch")
# a program's [BR, BN] tiles of h and B: at most TILE elements (sm_90, 4 warps: 2048 keeps BR = 16..64, K = 2..8 at
# 96-168 registers without spills, where BR = 64 with BN = 128 spilled), BN at most BN_MAX output columns. CUDA:
# 32, the fastest of 32 / 64 / 128 / 256 in every routed row of the H200 epilogue benchmark (LLaMA-3-8B groups,
# T 1 and 8, per-sequence and gate-logit routes: outputs/tables/kernel_bench_epilogue.md), e.g. MeteoRA's routed
# epilogues summed over a decode token at T = 1: 1.29 ms at 32 against 2.01 ms at 128 over the base GEMMs. A
# decode launch has few tokens, so narrower blocks mean more programs on the SMs and a shorter top-k chain in each.
# The interpreter: small, so the tests' blocks straddle members.
TILE = {"cuda": 2048, "cpu": 256}
BN_MAX = {"cuda": 32, "cpu": 32}


def default_block_n(R: int, device_type: str) -> int:
    """Output columns a program takes for rank width R (padded to BR, a power of two) on ``device_type``."""
    br = 1 << max(R - 1, 0).bit_length()
    kind = "cuda" if device_type == "cuda" else "cpu"
    return min(BN_MAX[kind], max(16, TILE[kind] // br))


def _check(y, h, B, col_member, ids, weights, seq_ids, logits, top_k, temperature, out):
    """Shape checks only (no device value is read; ``col_member`` is range-checked where it lives on the host)."""
    def bad(msg):
        raise ValueError(f"expand_shrunk: {msg}")

    if y.dim() != 2 or h.dim() != 4 or B.dim() != 3:
        bad(f"y must be [T, N], h [T, n, L, R], B [L, R, N]; got {tuple(y.shape)} / {tuple(h.shape)} / {tuple(B.shape)}")
    T, N = y.shape
    n, L, R = h.shape[1:]
    if h.shape[0] != T or tuple(B.shape) != (L, R, N):
        bad(f"h {tuple(h.shape)} and B {tuple(B.shape)} do not match y {tuple(y.shape)} (h [T, n, L, R], B [L, R, N])")
    if col_member.shape != (N,) or col_member.dtype not in (torch.int32, torch.int64):
        bad(f"col_member must be int [N={N}], got {col_member.dtype} {tuple(col_member.shape)}")
    if col_member.device.type == "cpu" and N and (int(col_member.min()) < 0 or int(col_member.max()) >= n):
        bad(f"col_member names members outside [0, {n})")
    if (logits is None) == (ids is None):
        bad("pass a route: ids and weights, or logits with top_k (not both)")
    if logits is not None:
        if tuple(logits.shape) != (T, n, L):
            bad(f"logits must be [T, n, L] = {(T, n, L)}, got {tuple(logits.shape)}")
        if not 1 <= top_k <= L or L > 128:
            bad(f"top_k must be in [1, L={L}] (and L <= 128), got {top_k}")
        if not temperature > 0:
            bad(f"temperature must be > 0, got {temperature}")
    else:
        if weights is None or ids.dim() != 2 or ids.shape != weights.shape:
            bad(f"ids and weights must both be [S, K], got {tuple(ids.shape)} / "
                f"{None if weights is None else tuple(weights.shape)}")
        if seq_ids is None and ids.shape[0] != T:
            bad(f"token routing needs ids [T={T}, K], got {tuple(ids.shape)}; pass seq_ids for sentence routing")
        if seq_ids is not None and seq_ids.shape != (T,):
            bad(f"seq_ids must be [T={T}], got {tuple(seq_ids.shape)}")
        if ids.device.type == "cpu":
            check_ids(ids, L, "expand_shrunk")
    if out is not None and (tuple(out.shape) != (T, N) or out.dtype != y.dtype):
        bad(f"out must be [T, N] of y's dtype {y.dtype}, got {out.dtype} {tuple(out.shape)}")
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (y, h, B, weights, logits)):
        bad("inference only (no autograd): call it under torch.no_grad() or on detached tensors")


def expand_shrunk_torch(y, h, B, col_member, *, ids=None, weights=None, seq_ids=None, logits=None, top_k=0,
                        temperature=1.0) -> torch.Tensor:
    """The vectorised reference: ``y + delta`` as a new tensor (fp32 accumulation, fp64 for fp64 inputs).

    Gathers, per (token, member, slot), the routed adapter's h row ([T, n, K, R]), then per output column its
    member's rows and B column ([T, N, R] per slot): only routed adapters are read, one slot at a time."""
    T, N = y.shape
    n, L, R = h.shape[1:]
    acc = torch.float64 if y.dtype == torch.float64 else torch.float32
    if logits is not None:
        top, a = logits.to(acc).topk(top_k, dim=-1)  # [T, n, k]
        w = torch.softmax(top / temperature, -1)
    else:
        if seq_ids is not None:
            ids, weights = ids.index_select(0, seq_ids), weights.index_select(0, seq_ids)
        a = ids.long()[:, None, :].expand(T, n, ids.shape[1])
        w = weights.to(acc)[:, None, :].expand(T, n, ids.shape[1])
    valid = (a >= 0) & (a < L)
    a = torch.where(valid, a, 0)
    hs = h.gather(2, a[..., None].expand(*a.shape, R)).to(acc)  # [T, n, K, R]
    coef = torch.where(valid[..., None], hs * w[..., None], 0)  # select: an empty slot's NaN h / weight stay out
    member = col_member.long()
    cols = torch.arange(N, device=y.device)
    Bt = B.permute(2, 0, 1)  # [N, L, R] view: column c of adapter a is Bt[c, a]
    out = y.to(acc, copy=True)  # a new tensor even with no slot (K = 0)
    for k in range(a.shape[2]):
        c = coef[:, member, k]  # [T, N, R]
        b = Bt[cols[None, :], a[:, member, k]].to(acc)  # [T, N, R]: the routed adapter's B column
        out = out + torch.where(c != 0, c * b, 0).sum(-1)
    return out.to(y.dtype).contiguous()


def _contig(t):
    return t if t is None or t.is_contiguous() else t.contiguous()


def expand_shrunk(y, h, B, col_member, *, ids=None, weights=None, seq_ids=None, logits=None, top_k=0,
                  temperature=1.0, out=None, backend="auto", block_n=None, block_t=1) -> torch.Tensor:
    """``y + sum_k w_k h[t, m, a_k] @ B[a_k]`` per token t and output column (member m), into ``out`` if given
    (``out`` may be ``y``: in place), else a new contiguous [T, N] tensor of y's dtype.

    Shapes: y [T, N] (row stride free, a view of the GEMM output), h [T, n, L, R] (any strides), B [L, R, N]
    (y's dtype or fp32), col_member int [N]; route ``ids``/``weights`` [S, K] (+ ``seq_ids`` [T], else S = T; id -1
    = empty slot) or ``logits`` [T, n, L] with ``top_k`` (>= 1, L <= 128) and ``temperature``.

    ``block_n``: output columns per program of the Triton kernel (grid T x cdiv(N, block_n)); a power of two
    >= 16, or None for ``default_block_n(R, device)``. The torch backend ignores it (benchmarks pass
    it: ``kernels.bench.epilogue``). ``block_t``: tokens a program takes (1 to 16; grid cdiv(T, block_t) x
    cdiv(N, block_n)): at a decode batch, fewer programs each doing several tokens' independent loads. The H200
    epilogue benchmark timed it slower at block_t = T = 8 in every group (2.2-2.5 against 1.0-1.1 ms per decode
    token of the 8B shape), so 1 stays the default."""
    if backend not in BACKENDS:
        raise ValueError(f"expand_shrunk: unknown backend {backend!r}; use one of {BACKENDS}")
    if block_n is not None and (not isinstance(block_n, int) or block_n < 16 or block_n & (block_n - 1)):
        raise ValueError(f"expand_shrunk: block_n must be a power of two >= 16 (or None), got {block_n!r}")
    if not isinstance(block_t, int) or not 1 <= block_t <= 16:
        raise ValueError(f"expand_shrunk: block_t must be an int in [1, 16], got {block_t!r}")
    _check(y, h, B, col_member, ids, weights, seq_ids, logits, top_k, temperature, out)
    if backend == "auto":
        backend = "triton" if y.is_cuda else "torch"
    if backend == "torch":
        res = expand_shrunk_torch(y, h, B, col_member, ids=ids, weights=weights, seq_ids=seq_ids, logits=logits,
                                  top_k=top_k, temperature=temperature)
        return res if out is None else out.copy_(res)
    from kernels import triton_shrunk_expand  # lazy: after TRITON_INTERPRET is chosen

    if out is None:
        out = torch.empty(*y.shape, dtype=y.dtype, device=y.device)
        if switches.state.poison:  # tests: a column the kernel misses shows as NaN
            out.fill_(float("nan"))
    bn = block_n or default_block_n(h.shape[3], y.device.type)
    col_member = _contig(col_member)
    one = logits is not None and blocks_in_one_member(col_member, bn)
    return triton_shrunk_expand.launch(y, h, B, col_member, out, ids, weights, _contig(seq_ids), logits, top_k,
                                       temperature, bn, one_member=one, block_t=block_t)


def blocks_in_one_member(col_member: torch.Tensor, block_n: int) -> bool:
    """True when every block of ``block_n`` columns lies in one member (each member boundary a multiple of
    ``block_n``). Kept per ``col_member`` version (one host read the first time, ``kernels.derived_cache``); inside
    a CUDA graph capture only a kept answer is used, else False (the per-column path, right for any layout)."""
    def find() -> bool:
        edges = (col_member[1:] != col_member[:-1]).nonzero().squeeze(1) + 1  # first column of each later member
        return bool((edges % block_n == 0).all())

    return kept_when_frozen(("blocks_in_one_member", block_n), (col_member,), find, trains=False,
                            otherwise=lambda: False)
