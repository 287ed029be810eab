"""Vectorised torch path of the multi-LoRA op for token routing (the CPU default, and MeteoRA's training form).

    h     = x @ [A_0 | A_1 | ... | A_{L-1}]                       [T, L*R]  (one GEMM over the whole bank)
    h     = where(routed & j < r_a, h * C, 0),  C[t, a, j] = s_a * sum_k [ids[t,k] == a] * w[t,k]
    out   = base + h @ [B_0; B_1; ...; B_{L-1}]                   [T, d_out]  (B viewed as [L*R, d_out])

``multi_lora_torch`` (the backend) uses it when the routed (token, slot) pairs are many; for few pairs (decode: one
token per sequence) ``multi_lora_gathered`` copies just the routed adapters instead.

The dense form does L/K times the FLOPs of the routed computation, which is cheap for small adapters (28 adapters of
r = 8 on SmolLM2's 576-wide projections add 224 columns) and, being two plain GEMMs and a few element-wise selects,
costs a handful of launches and no sort: on a GPU it is what MeteoRA's gate training runs (the Triton grouped
kernels' routing metadata costs more host time per call than these products). Plain autograd differentiates it
in x, A, B and weights. The [d_in, L*R] layout of A is one small copy per call (cached while A is frozen).

Non-finite weights. The dense form multiplies every token by every adapter, and a zero times a NaN or Inf is NaN:
one bad value in an adapter nobody routes to would reach every output through ``h @ B_cat`` and every input
gradient through ``dh @ A_cat^T``. So the bank's copies select away (``where``) not only the rank padding but every
adapter column that holds a non-finite value (two [L, R] sums find them, cached with the copies while the bank is
frozen), and a token routed to an adapter with such a column below its rank gets a NaN output row: its own adapter
is broken (the reference gives NaN or Inf in the affected columns). That NaN enters through the token's
coefficient for the broken adapter, so it costs nothing per output element and flows back like the reference's
(the step's loss is NaN either way). The guarantee is per token: a token's output and its share of every
gradient are those of a clean run as long as the adapters *it* routes to are finite, whatever the other tokens of
the call route to.

The gathered form reads only each token's own adapters. Where the bank is known to be finite (checked once per
bank version on the host: CPU inference) it runs as below; otherwise (training, CUDA, a broken bank) it selects the
empty slots (which stand in as adapter 0) and the padding out of its gathered copies and coefficients, so it is per
token too, with the reference's values for a token routed to a broken adapter.
"""

from __future__ import annotations

import torch

from kernels.derived_cache import derived
from kernels.reference import expand_sequence_routing
from kernels.route_tables import rank_mask, slot_coefficients, tables

GATHER_MAX_PAIRS = 16  # the gathered form also for up to this many routed pairs (few tokens, even with L = 1)


def multi_lora_torch(x, base, A, B, scales, ranks, ids, weights, seq_ids=None) -> torch.Tensor:
    """The torch backend: the gathered form when the routed pairs are few (decode: fewer than the adapters, or at
    most GATHER_MAX_PAIRS), else dense. ``seq_ids`` (sentence routing) is expanded per token here."""
    pairs = (ids.shape[0] if seq_ids is None else seq_ids.numel()) * ids.shape[1]
    if pairs <= max(A.shape[0] - 1, GATHER_MAX_PAIRS):
        return multi_lora_gathered(x, base, A, B, scales, ranks, ids, weights, seq_ids)
    return multi_lora_dense(x, base, A, B, scales, ranks, *expand_sequence_routing(ids, weights, seq_ids))


def _routed_pairs(ids, weights, seq_ids, acc):
    """Per token: adapter index of each slot ([T*K], empty slots read adapter 0) and its weight ([T, K], 0 when
    empty), sentence routing expanded through seq_ids."""
    ids, weights = expand_sequence_routing(ids, weights, seq_ids)
    valid = ids >= 0
    return ids.clamp(min=0).reshape(-1), torch.where(valid, weights.to(acc), 0.0)


def multi_lora_gathered(x, base, A, B, scales, ranks, ids, weights, seq_ids=None) -> torch.Tensor:
    """Few tokens (decode): copy only the routed adapters, A[a] [T, K, d_in, R] and B[a] [T, K*R, d_out], and
    contract them per token; T*K adapter copies instead of L adapters' FLOPs for every token.

    Eight torch ops a call: what depends only on a sentence route (one per forward, shared by every projection) or
    only on the projection's scales/ranks is derived once and cached (``kernels.derived_cache``) when no gradient
    flows into them, so the decode loop's 200-odd calls per token do not redo it. Token routes (MeteoRA: a gate
    output per projection) are never shared, so they are not cached. Where the bank is not known to be finite
    (``bank_is_finite``) the select form runs instead (``_gathered_select``)."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    T = x.shape[0]
    K, (_, d_in, R), d_out = ids.shape[1], A.shape, B.shape[2]
    if not bank_is_finite(A, B):
        return _gathered_select(x, base, A, B, scales, ranks, ids, weights, seq_ids, acc)
    reuse = not torch.compiler.is_compiling()  # a compiled graph computes them itself (the cache is host state)
    if seq_ids is None or not reuse or (torch.is_grad_enabled() and weights.requires_grad):
        # token routing: every projection has its own gate output, nothing to share
        adapter, wv = _routed_pairs(ids, weights, seq_ids, acc)
    else:
        adapter, wv = derived(("pairs", acc), (ids, weights, seq_ids), lambda: _routed_pairs(ids, weights, seq_ids, acc))
    mask = tables(scales, ranks, R, acc)[1]  # [L, R]: s_a where j < r_a, else 0
    A_sel = A.index_select(0, adapter).view(T, K, d_in, R).to(acc)
    h = torch.matmul(x.to(acc).view(T, 1, 1, d_in), A_sel).view(T, K, R)
    h = h * (wv.view(T, K, 1) * mask.index_select(0, adapter).view(T, K, R))
    B_sel = B.index_select(0, adapter).view(T, K * R, d_out).to(acc)
    delta = torch.bmm(h.view(T, 1, K * R), B_sel).view(T, d_out)  # sum over slots inside the product
    return (base.to(acc) + delta).to(base.dtype)


def _gathered_select(x, base, A, B, scales, ranks, ids, weights, seq_ids, acc):
    """The gathered form with every empty slot (adapter 0 stands in) and every column past a rank selected away in
    the copies and the coefficients (``route_tables.slot_coefficients``): no value of theirs is multiplied."""
    T, K = x.shape[0], ids.shape[1]
    (_, d_in, R), d_out = A.shape, B.shape[2]
    a, keep, coef = slot_coefficients(*expand_sequence_routing(ids, weights, seq_ids), scales, ranks, R)
    a = a.reshape(-1)
    A_sel = torch.where(keep.view(T, K, 1, R), A.index_select(0, a).view(T, K, d_in, R).to(acc), 0.0)
    B_sel = torch.where(keep.view(T, K * R, 1), B.index_select(0, a).view(T, K * R, d_out).to(acc), 0.0)
    h = torch.matmul(x.to(acc).view(T, 1, 1, d_in), A_sel).view(T, K, R) * coef.to(acc)
    delta = torch.bmm(h.view(T, 1, K * R), B_sel).view(T, d_out)
    return (base.to(acc) + delta).to(base.dtype)


def finite_columns(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """[L, R] bool: A[a, :, j] and B[a, j, :] hold only finite values. Two sums over the bank (a sum is finite iff
    every term is; a sum of huge finite weights that overflows counts as non-finite, which is what it would be in
    the products too)."""
    acc = torch.promote_types(A.dtype, torch.float32)
    with torch.no_grad():
        return torch.isfinite(A.sum(1, dtype=acc) + B.sum(2, dtype=acc))


def bank_is_finite(A: torch.Tensor, B: torch.Tensor) -> bool:
    """True when every value of A and B is finite and that could be read on the host for free: CPU tensors, no
    gradient into them (their version then changes only with the bank, so the answer is cached per version), not
    compiling. False means "not known to be finite" (training, CUDA, torch.compile) as well as "not finite"."""
    if A.device.type != "cpu" or torch.compiler.is_compiling():
        return False
    if torch.is_grad_enabled() and (A.requires_grad or B.requires_grad):
        return False
    return derived(("bank_is_finite",), (A, B), lambda: bool(finite_columns(A, B).all()))


def bank_matrices(A: torch.Tensor, B: torch.Tensor, ranks: torch.Tensor):
    """``A_cat [d_in, L*R]``, ``B_cat [L*R, d_out]`` and ``broken [L]``: every column / row past an adapter's rank
    or holding a non-finite value selected to zero (whatever the bank stores there never reaches the output or a
    gradient), and which adapters have such a non-finite column below their rank. Copies of the weights, not of
    activations; derived once per bank version while A and B need no gradient (MeteoRA's gate training: the bank
    is frozen)."""
    L, d_in, R = A.shape

    def build(A, B):
        in_rank = rank_mask(ranks.to(A.device), R)  # [L, R]
        finite = finite_columns(A, B)
        keep = in_rank & finite
        A_cat = torch.where(keep[:, None, :], A, 0.0).permute(1, 0, 2).reshape(d_in, L * R)
        B_cat = torch.where(keep[:, :, None], B, 0.0).reshape(L * R, B.shape[2])
        return A_cat, B_cat, (in_rank & ~finite).any(1)

    if torch.compiler.is_compiling() or (torch.is_grad_enabled() and (A.requires_grad or B.requires_grad)):
        return build(A, B)
    return derived(("bank_matrices",), (A, B, ranks), lambda: build(A.detach(), B.detach()))


def multi_lora_dense(x, base, A, B, scales, ranks, ids, weights) -> torch.Tensor:
    """Same contract as ``kernels.reference.multi_lora_reference`` with token routing ids/weights [T, K].

    Two GEMMs over the whole bank: ``h = x @ [A_0 | ... | A_{L-1}]`` [T, L*R]; each token's block of adapter a
    scaled by c[t, a] = s_a * (sum of the token's slot weights that chose a), and selected away where no slot
    chose a; then ``out = base + h @ [B_0; ...; B_{L-1}]``. The routing enters as [T, L] tensors, so what autograd
    keeps per call beyond the GEMMs' own inputs is h and [T, L] (not [T, L*R] masks). On CUDA the products run in
    the activations' dtype (autocast casts them as it does any matmul); on the CPU in fp32 (fp64 for fp64). Tokens
    routed to an adapter with a non-finite weight get a NaN row (module docstring)."""
    acc = compute_dtype(x)
    T = x.shape[0]
    L, _, R = A.shape
    wacc = torch.float64 if weights.dtype == torch.float64 else torch.float32
    valid = ids >= 0
    a = ids.clamp(min=0)
    # per (token, adapter): the summed weight of the slots that chose it, and whether any did
    w_ta = torch.zeros(T, L, dtype=wacc, device=x.device).scatter_add(1, a, torch.where(valid, weights.to(wacc), 0.0))
    routed = torch.zeros(T, L, dtype=wacc, device=x.device).scatter_add(1, a, valid.to(wacc)) > 0
    A_cat, B_cat, broken = bank_matrices(A, B, ranks)
    # a token routed to an adapter with a non-finite weight gets NaN through h into its whole row (the adapter's
    # columns of A_cat / B_cat are zeros, and NaN * 0 is NaN): no extra pass over the output
    coef = torch.where(routed & broken, float("nan"), w_ta * scales.to(x.device, wacc))  # [T, L]
    h = (x.to(acc) @ A_cat.to(acc)).view(T, L, R)
    h = torch.where(routed[:, :, None], h * coef.to(h.dtype)[:, :, None], 0.0)
    out = torch.addmm(base.reshape(T, -1).to(acc), h.view(T, L * R).to(acc), B_cat.to(acc))
    return out.to(base.dtype)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """Compute dtype of the torch forms: the activations' own on CUDA, at least fp32 on the CPU (bf16 is slow there)."""
    if x.is_cuda:
        return x.dtype
    return torch.float64 if x.dtype == torch.float64 else torch.float32
