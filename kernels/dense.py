"""Vectorised torch path of the multi-LoRA op (the CPU default): three dense products, no Python loop.

    h     = x @ A_a for every adapter a at once                  [L, T, R]  (one batched product; A is not copied)
    h    *= C  where C[a, t, j] = s_a * sum_k [ids[t,k] == a] * w[t,k] * [j < r_a]   (routing as a mask)
    out   = base + [h_0 | h_1 | ... | h_{L-1}] @ [B_0; B_1; ...; B_{L-1}]   [T, d_out]  (B viewed as [L*R, d_out])

``multi_lora_torch`` (the backend) uses it when the routed (token, slot) pairs are many; for few pairs (decode: one
token per sequence) ``multi_lora_gathered`` copies just the routed adapters instead.

The dense form does L/K times the FLOPs of the routed computation, which is cheap for the few small adapters of CPU training
and far faster than the reference's loop; plain autograd differentiates it in x, A, B and weights. Nothing is
copied per call beyond the [T, L*R] activations (an earlier version re-laid A out as [d_in, L*R] on every call,
which cost more than the products at decode).
"""

from __future__ import annotations

import torch

from kernels.derived_cache import derived
from kernels.reference import expand_sequence_routing

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


def _scale_rank_mask(scales, ranks, R, acc):
    """[L, R]: s_a where j < r_a, else 0 (columns past an adapter's rank are ignored)."""
    keep = torch.arange(R, device=scales.device) < ranks.to(scales.device)[:, None]
    return torch.where(keep, scales.to(acc)[:, None], 0.0)


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
    if not reuse or (torch.is_grad_enabled() and scales.requires_grad):
        mask = _scale_rank_mask(scales, ranks, R, acc)
    else:
        mask = derived(("scale_rank", acc, R), (scales, ranks), lambda: _scale_rank_mask(scales, ranks, R, acc))
    A_sel = A.index_select(0, adapter).view(T, K, d_in, R).to(acc)
    h = torch.matmul(x.to(acc).view(T, 1, 1, d_in), A_sel).view(T, K, R)
    h = h * (wv.view(T, K, 1) * mask.index_select(0, adapter).view(T, K, R))
    B_sel = B.index_select(0, adapter).view(T, K * R, d_out).to(acc)
    delta = torch.bmm(h.view(T, 1, K * R), B_sel).view(T, d_out)  # sum over slots inside the product
    return (base.to(acc) + delta).to(base.dtype)


def multi_lora_dense(x, base, A, B, scales, ranks, ids, weights) -> torch.Tensor:
    """Same contract as ``kernels.reference.multi_lora_reference`` with token routing ids/weights [T, K]."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    T = x.shape[0]
    L, _, R = A.shape
    valid = ids >= 0
    adapter = torch.where(valid, ids, torch.zeros_like(ids)).long()
    coef = torch.where(
        valid, weights.to(acc) * scales.to(acc)[adapter], torch.zeros((), dtype=acc, device=x.device)
    )
    per_adapter = torch.zeros(T, L, dtype=acc, device=x.device).scatter_add(1, adapter, coef)  # [T, L]
    rank_mask = torch.arange(R, device=x.device)[None, :] < ranks.to(x.device)[:, None]  # [L, R]
    h = torch.matmul(x.to(acc), A.to(acc))  # [L, T, R]
    h = h * (per_adapter.t()[:, :, None] * rank_mask[:, None, :])
    h = h.transpose(0, 1).reshape(T, L * R)
    return (base.to(acc) + h @ B.to(acc).reshape(L * R, -1)).to(base.dtype)
