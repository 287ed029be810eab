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
"""

from __future__ import annotations

import torch

from kernels.derived_cache import derived
from kernels.reference import expand_sequence_routing
from kernels.route_tables import rank_mask, tables

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
    output per projection) are never shared, so they are not cached."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    T = x.shape[0]
    K, (_, d_in, R), d_out = ids.shape[1], A.shape, B.shape[2]
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


def _bank_matrices(A: torch.Tensor, B: torch.Tensor, ranks: torch.Tensor):
    """``A_cat [d_in, L*R]`` and ``B_cat [L*R, d_out]`` with every column / row past an adapter's rank selected to
    zero (whatever the bank stores there never reaches the output). Copies of the weights, not of activations;
    derived once per bank version while A and B need no gradient (MeteoRA's gate training: the bank is frozen)."""
    L, d_in, R = A.shape

    def build(A, B):
        keep = rank_mask(ranks.to(A.device), R)  # [L, R]
        A_cat = torch.where(keep[:, None, :], A, 0.0).permute(1, 0, 2).reshape(d_in, L * R)
        return A_cat, torch.where(keep[:, :, None], B, 0.0).reshape(L * R, B.shape[2])

    if torch.compiler.is_compiling() or (torch.is_grad_enabled() and (A.requires_grad or B.requires_grad)):
        return build(A, B)
    return derived(("bank_matrices",), (A, B, ranks), lambda: build(A.detach(), B.detach()))


def multi_lora_dense(x, base, A, B, scales, ranks, ids, weights) -> torch.Tensor:
    """Same contract as ``kernels.reference.multi_lora_reference`` with token routing ids/weights [T, K].

    Two GEMMs over the whole bank: ``h = x @ [A_0 | ... | A_{L-1}]`` [T, L*R]; each token's block of adapter a
    scaled by c[t, a] = s_a * (sum of the token's slot weights that chose a), and selected away where no slot
    chose a; then ``out = base + h @ [B_0; ...; B_{L-1}]``. The routing enters as [T, L] tensors, so what autograd
    keeps per call beyond the GEMMs' own inputs is h and [T, L] (not [T, L*R] masks). On CUDA the products run in
    the activations' dtype (autocast casts them as it does any matmul); on the CPU in fp32 (fp64 for fp64)."""
    acc = _acc(x)
    T = x.shape[0]
    L, _, R = A.shape
    wacc = torch.float64 if weights.dtype == torch.float64 else torch.float32
    valid = ids >= 0
    a = ids.clamp(min=0)
    # per (token, adapter): the summed weight of the slots that chose it, and whether any did
    w_ta = torch.zeros(T, L, dtype=wacc, device=x.device).scatter_add(1, a, torch.where(valid, weights.to(wacc), 0.0))
    routed = torch.zeros(T, L, dtype=wacc, device=x.device).scatter_add(1, a, valid.to(wacc)) > 0
    coef = w_ta * scales.to(x.device, wacc)  # [T, L]
    A_cat, B_cat = _bank_matrices(A, B, ranks)
    h = (x.to(acc) @ A_cat.to(acc)).view(T, L, R)
    h = torch.where(routed[:, :, None], h * coef.to(h.dtype)[:, :, None], 0.0)
    out = torch.addmm(base.reshape(T, -1).to(acc), h.view(T, L * R).to(acc), B_cat.to(acc))
    return out.to(base.dtype)


def _acc(x: torch.Tensor) -> torch.dtype:
    """Compute dtype of the torch forms: the activations' own on CUDA, at least fp32 on the CPU (bf16 is slow there)."""
    if x.is_cuda:
        return x.dtype
    return torch.float64 if x.dtype == torch.float64 else torch.float32
