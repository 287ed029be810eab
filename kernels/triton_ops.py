"""Launchers for the Triton kernels: routing metadata, forward (fused decode, small-T or grouped), fused backward.

Forward by token count T: one ``token_fused_kernel`` launch at decode (T <= FUSED_T_MAX, where recomputing x @ A
per d_out tile is cheap), else the two-launch split-K token path (T <= SMALL_T_MAX), else the grouped kernels.
Everything here is asynchronous on the device: routing is a key kernel, one ``torch.sort`` and one
``torch.searchsorted`` (the token paths need none); all grids have static sizes (``cdiv(T*K, BM) + K*(L+1)`` blocks) and no value is read back
to the host, so a forward or backward can be captured in a CUDA graph. On CPU tensors the same launches run under
``TRITON_INTERPRET=1`` (tests), where every dot is done in fp32 because the interpreter's bf16 dot is unreliable.
"""

from __future__ import annotations

import functools
import os

import torch
import triton

from kernels import switches
from kernels import triton_bank as tb
from kernels import triton_kernels as tk

# token counts up to which the sort-free paths are used (tests override them): one fused launch up to
# FUSED_T_MAX, the two-launch split-K path up to SMALL_T_MAX, the grouped (sorted) kernels above
SMALL_T_MAX = int(os.environ.get("LORAMUX_SMALL_T_MAX", "64"))
FUSED_T_MAX = int(os.environ.get("LORAMUX_FUSED_T_MAX", "64"))
# The grouped shrink runs all K slots in one launch while it has at most this many (slot, adapter) groups to scan
# per program (K = 2, L <= 127), else one launch per slot (see slot_group_ranges).
SHRINK_ONE_LAUNCH_GROUPS = int(os.environ.get("LORAMUX_SHRINK_ONE_LAUNCH_GROUPS", "256"))
# the fused kernel recomputes h = x @ A[a] in every d_out tile: it is used only while that stays cheap, i.e. each
# program's serial loop over d_in has at most FUSED_CHAIN_MAX steps and the A re-reads (from L2) of all programs
# stay under FUSED_L2_BYTES; past either the two-launch split-K path is faster. Measured (H200, T = 1, NOTES.md):
# 8 steps (d_in 4096 at r <= 16) made 4096 -> 4096 1.7-1.9x slower than two launches; 2 and 1 tie on LLaMA shapes
FUSED_CHAIN_MAX = int(os.environ.get("LORAMUX_FUSED_CHAIN_MAX", "2"))
FUSED_L2_BYTES = float(os.environ.get("LORAMUX_FUSED_L2_BYTES", "16e6"))
# the bank-wide path (``triton_bank``: every adapter computed, routing applied as a coefficient) costs L / K times
# the routed FLOPs and runs at ~210 TFLOP/s on these skinny GEMMs (H200), so it pays only for narrow banks. Measured
# (H200, outputs/tables/kernel_bench_paths.md): at prefill it beats the sorted kernels up to L * R = 128 columns
# (L = 4 or 8 at 4096^2, T = 4096: 1.48-1.66x vs 1.64-1.79x) and ties or loses from 224 (L = 28); at small T it wins
# up to 64 columns, and for wide outputs (d_out >= 2 d_in, T >= 32) up to 448 (4096 -> 14336, T = 64, L = 28:
# 2.1-2.8x vs 3.7-3.9x), and loses elsewhere (4096^2, T = 1-64: up to 2.4x slower)
BANK_LR_MAX = int(os.environ.get("LORAMUX_BANK_LR_MAX", "128"))
BANK_SMALL_LR_MAX = int(os.environ.get("LORAMUX_BANK_SMALL_LR_MAX", "64"))
BANK_WIDE_LR_MAX = int(os.environ.get("LORAMUX_BANK_WIDE_LR_MAX", "448"))
BANK_PART_BYTES = 256e6  # h ([splits, T, L * R], fp32 partials at small T) stays under this, else the routed paths
# "auto", or force one forward path: "bank", "token" (fused / two-launch, T <= SMALL_T_MAX), "grouped" (benchmarks)
FORWARD_PATH = os.environ.get("LORAMUX_FORWARD_PATH", "auto")
FORWARD_PATHS = ("auto", "bank", "token", "grouped")


def _buffer(*shape, dtype, device) -> torch.Tensor:
    if switches.state.poison:  # tests (kernels.switches.poisoned_buffers): an element no kernel wrote shows as NaN
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(*shape, dtype=dtype, device=device)


# FTILE: elements of the [FBK, BR] A tile a fused program loads per step (FBK = FTILE // BR, 64 per thread)
# BANK_BM: (T up to, row tile) of the bank kernels; BANK_BN: the bank shrink's column tile
_CUDA_CONFIG = {"BM": 64, "CHUNK": 256, "TBK": 64, "TBN": 64, "warps": 4, "MIN_CHUNK": 512, "PROGRAMS": 528,
                "CHUNK_ALIGN": 128, "PP": 1, "TT": 1, "FTILE": 8192, "FBN": 128, "FTT": 1,
                "BANK_BM": ((16, 16), (64, 64), (None, 128)), "BANK_BN": 64, "BANK_MIN_CHUNK": 256}  # fmt: skip
_INTERPRETER_CONFIG = {"BM": 16, "CHUNK": 32, "TBK": 16, "TBN": 32, "warps": 4, "MIN_CHUNK": 16, "PROGRAMS": 24,
                       "CHUNK_ALIGN": 16, "PP": 2, "TT": 4, "FTILE": 256, "FBN": 32, "FTT": 3,
                       "BANK_BM": ((None, 16),), "BANK_BN": 16, "BANK_MIN_CHUNK": 16}  # fmt: skip


def _config(device: torch.device) -> dict:
    """Launch sizes the autotuner does not choose (the grouped kernels' tiles are tuned in triton_kernels)."""
    return _CUDA_CONFIG if device.type == "cuda" else _INTERPRETER_CONFIG


@functools.cache
def block_rank(R: int) -> int:
    """Rank padded for the kernels: a power of two (tl.arange), at least 16 (tl.dot)."""
    return max(16, triton.next_power_of_2(R))


def _fused_bk(cfg: dict, T: int, D: int, DO: int, BR: int, elem: int):
    """The fused kernel's step over d_in, or None where the fused path would be slower than two launches: T too
    large, a loop over d_in of more than FUSED_CHAIN_MAX steps, or more than FUSED_L2_BYTES of A re-read."""
    if T > FUSED_T_MAX:
        return None
    bk = min(max(16, cfg["FTILE"] // BR), triton.next_power_of_2(D))
    if triton.cdiv(D, bk) > FUSED_CHAIN_MAX or T * triton.cdiv(DO, cfg["FBN"]) * D * BR * elem > FUSED_L2_BYTES:
        return None
    return bk


def _use_f32(x: torch.Tensor) -> bool:
    return x.dtype == torch.float32 or x.dtype == torch.float64 or x.device.type != "cuda"


def route_groups(ids: torch.Tensor, ranks: torch.Tensor, L: int):
    """Sort the T*K routing pairs by (slot, adapter). Returns (perm int32 [N], off int32 [G+1], sorted keys [N])."""
    T, K = ids.shape
    N, G = T * K, K * (L + 1)
    keys = torch.empty(N, dtype=torch.int32, device=ids.device)
    tk.routing_keys_kernel[(triton.cdiv(N, 1024),)](ids, ranks, keys, N, L, K=K, BLOCK=1024)
    sorted_keys, perm = torch.sort(keys, stable=True)
    groups = torch.arange(G + 1, dtype=torch.int32, device=ids.device)
    off = torch.searchsorted(sorted_keys, groups, out_int32=True)
    return perm.to(torch.int32), off, sorted_keys


def slot_group_ranges(off: torch.Tensor, N: int, L: int, K: int, one_launch: bool):
    """The (offsets, groups, rows) each grouped launch searches: all K (L + 1) groups at once, or slot k's L + 1
    groups alone (a view of ``off`` from group k (L + 1) on: its offsets are absolute rows, its last one the next
    slot's first). Every program of a grouped kernel scans all offsets it is given (``_locate_block``), so the
    per-slot form keeps that scan at L + 1 when K (L + 1) is large (DLP's nucleus can keep dozens of adapters)."""
    if one_launch:
        return [(off, K * (L + 1), N)]
    return [(off[k * (L + 1):], L + 1, N // K) for k in range(K)]


def _shrink(X, W, w_strides, perm, off, ranks, L, K, BR, cfg, f32):
    """u [N, BR] fp32 in sorted order: u[row] = X[t(row)] @ W[a] where W[a] is [D, R] through ``w_strides``.

    D is split over enough programs to fill the device (about 4 per SM), each adding its part atomically. One
    launch for all slots while K (L + 1) <= SHRINK_ONE_LAUNCH_GROUPS, else one per slot (``slot_group_ranges``).
    """
    N, D = perm.numel(), X.shape[1]
    parts = slot_group_ranges(off, N, L, K, K * (L + 1) <= SHRINK_ONE_LAUNCH_GROUPS)
    plans = []
    for off_p, G, rows in parts:
        blocks = triton.cdiv(rows, cfg["BM"]) + G  # nominal; the tuned BM sets the real grid
        splits = max(1, min(triton.cdiv(D, cfg["MIN_CHUNK"]), triton.cdiv(cfg["PROGRAMS"], blocks)))
        chunk = triton.cdiv(triton.cdiv(D, splits), cfg["CHUNK_ALIGN"]) * cfg["CHUNK_ALIGN"]
        plans.append((off_p, G, rows, triton.cdiv(D, chunk), chunk))
    if any(p[3] > 1 for p in plans):
        u = torch.zeros(N, BR, dtype=torch.float32, device=X.device)
    else:
        u = _buffer(N, BR, dtype=torch.float32, device=X.device)
    for off_p, G, rows, splits, chunk in plans:
        tk.grouped_shrink_kernel[lambda m, rows=rows, G=G, splits=splits: (triton.cdiv(rows, m["BM"]) + G, splits)](
            X, W, perm, off_p, ranks, u, D, G, L, triton.next_power_of_2(N), X.stride(0), X.stride(1), *w_strides,
            chunk, K=K, BR=BR, GP=triton.next_power_of_2(G), F32=f32, ATOMIC=splits > 1,
        )  # fmt: skip
    return u


def _expand(u, W, w_strides, src, out, perm, off, ranks, scales, gates, L, K, BR, cfg, f32, zero_src):
    """out[t] = src[t] + sum_k c * u @ W[a] (W[a] is [R, DO] through ``w_strides``): one launch per slot, each over
    that slot's L + 1 groups only (``slot_group_ranges``), so its grid and offset scan do not grow with K."""
    N, DO = perm.numel(), out.shape[1]
    for k, (off_k, G, rows) in enumerate(slot_group_ranges(off, N, L, K, one_launch=False)):
        s = src if k == 0 else out
        tk.grouped_expand_kernel[lambda m, rows=rows, G=G: (triton.cdiv(rows, m["BM"]) + G, triton.cdiv(DO, m["BN"]))](
            u, W, s, out, perm, off_k, ranks, scales, gates, DO, G, L, triton.next_power_of_2(N), k, *w_strides,
            s.stride(0), s.stride(1), out.stride(0), out.stride(1),
            K=K, BR=BR, GP=triton.next_power_of_2(G), F32=f32, ZERO_SRC=zero_src and k == 0,
        )  # fmt: skip
    return out


def pad_slots(ids: torch.Tensor, gates: torch.Tensor):
    """K routing slots -> the next power of two, the added slots empty (id -1, weight 0). Every kernel takes K as a
    compile-time constant, so a router whose number of kept adapters varies (DLP's top-p nucleus) would compile a
    variant for each K it meets; padded, at most log2(L) + 1 of them. Empty slots are skipped on every path."""
    K = ids.shape[1]
    Kp = triton.next_power_of_2(max(K, 1))
    if Kp == K:
        return ids, gates
    pad = (ids.shape[0], Kp - K)
    return (torch.cat([ids, torch.full(pad, -1, dtype=ids.dtype, device=ids.device)], 1),
            torch.cat([gates, torch.zeros(pad, dtype=gates.dtype, device=gates.device)], 1))


def _bank_plan(cfg: dict, T: int, D: int, LR: int):
    """(row tile, split count, chunk of d_in) of the bank shrink. A prefill has row tiles enough (one split, h in the
    data dtype); a small T is split over d_in until about cfg["PROGRAMS"] programs are in flight, in chunks of at
    least BANK_MIN_CHUNK (h in fp32 partials)."""
    BM = next(bm for t_max, bm in cfg["BANK_BM"] if t_max is None or T <= t_max)
    tiles = triton.cdiv(T, BM) * triton.cdiv(LR, cfg["BANK_BN"])
    split = max(1, min(triton.cdiv(cfg["PROGRAMS"], tiles), triton.cdiv(D, cfg["BANK_MIN_CHUNK"])))
    if T > SMALL_T_MAX:
        split = 1
    chunk = triton.cdiv(triton.cdiv(D, split), cfg["CHUNK_ALIGN"]) * cfg["CHUNK_ALIGN"]
    return BM, triton.cdiv(D, chunk), chunk


def forward_path(cfg: dict, T: int, L: int, R: int, D: int, DO: int) -> str:
    """Which forward runs: "bank" (every adapter, ``triton_bank``), "token" (sort-free per-pair kernels, T <=
    SMALL_T_MAX) or "grouped" (pairs sorted by adapter). ``kernels.switches.forced_path`` or ``FORWARD_PATH`` forces
    one (the token path only at small T)."""
    forced = switches.state.forward_path or FORWARD_PATH
    if forced not in FORWARD_PATHS:
        raise ValueError(f"LORAMUX_FORWARD_PATH={forced!r} is not a forward path; use one of {FORWARD_PATHS}")
    small = T <= SMALL_T_MAX
    if forced != "auto":
        return "grouped" if forced == "token" and not small else forced
    lr = L * R
    if small:
        bank = lr <= BANK_SMALL_LR_MAX or (T >= 32 and DO >= 2 * D and lr <= BANK_WIDE_LR_MAX)
    else:
        bank = lr <= BANK_LR_MAX
    # only then the h buffer's size (the decode hot path of a wide bank never plans the bank kernels)
    bank = bank and _bank_plan(cfg, T, D, lr)[1] * T * lr * 4 <= BANK_PART_BYTES
    return "bank" if bank else ("token" if small else "grouped")


def _bank_forward(x, base, A, B, scales, ranks, ids, gates, seq_ptr, seq, out, cfg):
    """out = base + (C * (x @ A_cat)) @ B_cat (``kernels.triton_bank``): the shrink (routing coefficient in its
    epilogue), then one expand for all K slots."""
    T, D = x.shape
    L, _, R = A.shape
    DO, K, LR = base.shape[1], ids.shape[1], L * R
    BM, split, chunk = _bank_plan(cfg, T, D, LR)
    BN = cfg["BANK_BN"]
    f32, TB = _use_f32(x), triton.next_power_of_2(T)
    skip = T <= SMALL_T_MAX or seq
    h = _buffer(split, T, LR, dtype=x.dtype if split == 1 else torch.float32, device=x.device)
    tb.bank_shrink_kernel[(triton.cdiv(T, BM), triton.cdiv(LR, BN), split)](
        x, A, ranks, scales, ids, seq_ptr, gates, h, T, D, LR, chunk, TB, x.stride(0), x.stride(1), *A.stride(),
        R=R, K=K, BM=BM, BN=BN, SEQ=seq, SKIP=skip, F32=f32,
    )  # fmt: skip
    tb.bank_expand_kernel[lambda m: (triton.cdiv(T, BM), triton.cdiv(DO, m["BN"]))](
        h, B, base, out, ids, seq_ptr, ranks, T, DO, LR, TB,
        *B.stride(), base.stride(0), base.stride(1), out.stride(0), out.stride(1),
        R=R, K=K, SPLIT=split, BM=BM, SEQ=seq, SKIP=skip, ONE_WINDOW=L <= 64, F32=f32,
    )  # fmt: skip
    return out


def forward(x, base, A, B, scales, ranks, ids, gates, seq_ids=None) -> torch.Tensor:
    """out = base + routed deltas. x [T, d_in], base [T, d_out], ranks int32 [L], scales fp32 [L].

    Token routing: ids/gates [T, K]; sentence routing: ids/gates [S, K] and seq_ids [T] (the sort-free and bank
    paths read them through seq_ids, the grouped path gathers them per token). All contiguous, on x's device.
    """
    out = _buffer(*base.shape, dtype=base.dtype, device=base.device)
    if x.shape[0] == 0:
        return out
    ids, gates = pad_slots(ids, gates)
    T, K = x.shape[0], ids.shape[1]
    L, R = A.shape[0], A.shape[2]
    cfg, BR = _config(x.device), block_rank(R)
    D, DO = x.shape[1], base.shape[1]
    path = forward_path(cfg, T, L, R, D, DO)
    seq = seq_ids is not None
    seq_ptr = seq_ids if seq else ids  # any tensor: never read without SEQ
    if path == "bank":
        return _bank_forward(x, base, A, B, scales, ranks, ids, gates, seq_ptr, seq, out, cfg)
    if path == "token":
        bk = _fused_bk(cfg, T, D, DO, BR, A.element_size())
        if bk:
            tk.token_fused_kernel[(triton.cdiv(DO, cfg["FBN"]), triton.cdiv(T, cfg["FTT"]))](
                x, A, B, base, out, ids, seq_ptr, ranks, scales, gates, T, D, DO, L,
                x.stride(0), x.stride(1), *A.stride(), *B.stride(), base.stride(0), base.stride(1),
                out.stride(0), out.stride(1),
                K=K, TT=cfg["FTT"], BK=bk, BN=cfg["FBN"], BR=BR, SEQ=seq, num_warps=cfg["warps"],
            )  # fmt: skip
            return out
        split = triton.cdiv(D, cfg["CHUNK"])
        part = _buffer(T * K, split, BR, dtype=torch.float32, device=x.device)
        tk.token_shrink_kernel[(triton.cdiv(T * K, cfg["PP"]), split)](
            x, A, ids, seq_ptr, ranks, part, T * K, D, L, cfg["CHUNK"], x.stride(0), x.stride(1), *A.stride(),
            K=K, SPLIT=split, PP=cfg["PP"], BK=cfg["TBK"], BR=BR, SEQ=seq, num_warps=cfg["warps"],
        )  # fmt: skip
        tk.token_expand_kernel[(triton.cdiv(DO, cfg["TBN"]), triton.cdiv(T, cfg["TT"]))](
            part, B, base, out, ids, seq_ptr, ranks, scales, gates, T, DO, L, *B.stride(),
            base.stride(0), base.stride(1), out.stride(0), out.stride(1),
            K=K, SPLIT=split, SP=triton.next_power_of_2(split), TT=cfg["TT"], BN=cfg["TBN"], BR=BR, SEQ=seq,
            num_warps=cfg["warps"],
        )  # fmt: skip
        return out
    if seq:
        ids, gates = ids.index_select(0, seq_ids), gates.index_select(0, seq_ids)
    f32 = _use_f32(x)
    perm, off, _ = route_groups(ids, ranks, L)
    u = _shrink(x, A, A.stride(), perm, off, ranks, L, K, BR, cfg, f32)
    return _expand(u, B, B.stride(), base, out, perm, off, ranks, scales, gates, L, K, BR, cfg, f32, False)


def backward(grad, x, A, B, scales, ranks, ids, gates):
    """(dx, dA, dB, dgates) of ``forward``; dbase is ``grad`` itself. Recomputes u = x @ A rather than saving it."""
    T, K = ids.shape
    L, D, R = A.shape
    DO = B.shape[2]
    cfg, f32, BR = _config(x.device), _use_f32(x), block_rank(R)
    perm, off, sorted_keys = route_groups(ids, ranks, L)
    u = _shrink(x, A, A.stride(), perm, off, ranks, L, K, BR, cfg, f32)  # x @ A
    bt = (B.stride(0), B.stride(2), B.stride(1))  # B[a]^T as a [DO, R] matrix
    v = _shrink(grad, B, bt, perm, off, ranks, L, K, BR, cfg, f32)  # grad @ B^T
    at = (A.stride(0), A.stride(2), A.stride(1))  # A[a]^T as a [R, D] matrix
    dx = _buffer(*x.shape, dtype=x.dtype, device=x.device)
    _expand(v, A, at, dx, dx, perm, off, ranks, scales, gates, L, K, BR, cfg, f32, True)
    dA = _buffer(L, D, R, dtype=A.dtype, device=x.device)
    _wgrad_into(
        x,
        v,
        perm,
        off,
        ranks,
        scales,
        gates,
        dA,
        (dA.stride(0), dA.stride(1), dA.stride(2)),
        R,
        L,
        K,
        BR,
        cfg,
        f32,
    )
    dB = _buffer(L, R, DO, dtype=B.dtype, device=x.device)
    _wgrad_into(
        grad,
        u,
        perm,
        off,
        ranks,
        scales,
        gates,
        dB,
        (dB.stride(0), dB.stride(2), dB.stride(1)),
        R,
        L,
        K,
        BR,
        cfg,
        f32,
    )
    adapter = (sorted_keys % (L + 1)).long()
    valid = adapter < L
    s = scales.float()[adapter.clamp(max=L - 1)]
    dg_sorted = torch.where(valid, s * (u * v).sum(1), torch.zeros((), device=x.device))
    dg = torch.zeros(T * K, dtype=torch.float32, device=x.device).scatter_(0, perm.long(), dg_sorted)
    return dx, dA, dB, dg.view(T, K).to(gates.dtype)


def _wgrad_into(X, u, perm, off, ranks, scales, gates, dW, dw_strides, R, L, K, BR, cfg, f32):
    D = X.shape[1]
    tk.grouped_wgrad_kernel[lambda m: (L, triton.cdiv(D, m["BD"]))](
        X, u, perm, off, ranks, scales, gates, dW, D, L, R, triton.next_power_of_2(perm.numel()),
        X.stride(0), X.stride(1), *dw_strides, K=K, BR=BR, F32=f32,
    )  # fmt: skip
    return dW
