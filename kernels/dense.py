"""Vectorised torch path of the multi-LoRA op (the CPU default): three dense products, no Python loop.

    h     = x @ A_a for every adapter a at once                  [L, T, R]  (one batched product; A is not copied)
    h    *= C  where C[a, t, j] = s_a * sum_k [ids[t,k] == a] * w[t,k] * [j < r_a]   (routing as a mask)
    out   = base + [h_0 | h_1 | ... | h_{L-1}] @ [B_0; B_1; ...; B_{L-1}]   [T, d_out]  (B viewed as [L*R, d_out])

``multi_lora_torch`` (the backend) uses it when the routed (token, slot) pairs outnumber the adapters; for fewer
pairs (decode: one token per sequence) ``multi_lora_gathered`` copies just the routed adapters instead.

The dense form does L/K times the FLOPs of the routed computation, which is cheap for the few small adapters of CPU training
and far faster than the reference's loop; plain autograd differentiates it in x, A, B and weights. Nothing is
copied per call beyond the [T, L*R] activations (an earlier version re-laid A out as [d_in, L*R] on every call,
which cost more than the products at decode).
"""

from __future__ import annotations

import torch


def multi_lora_torch(x, base, A, B, scales, ranks, ids, weights) -> torch.Tensor:
    """The torch backend: the gathered form when the routed pairs are fewer than the adapters (decode), else dense."""
    if ids.numel() < A.shape[0]:
        return multi_lora_gathered(x, base, A, B, scales, ranks, ids, weights)
    return multi_lora_dense(x, base, A, B, scales, ranks, ids, weights)


def multi_lora_gathered(x, base, A, B, scales, ranks, ids, weights) -> torch.Tensor:
    """Small T (decode): copy only the routed adapters, A[ids] [T, K, d_in, R] and B[ids] [T, K, R, d_out], and
    contract them per token; T*K adapter copies instead of L adapters' FLOPs for every token."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    (T, K), (_, d_in, R), d_out = ids.shape, A.shape, B.shape[2]
    valid = ids >= 0
    adapter = ids.clamp(min=0).reshape(-1)  # [T*K]; empty slots read adapter 0 with coefficient 0
    coef = torch.where(valid, weights.to(acc) * scales.to(acc).index_select(0, adapter).view(T, K), 0.0)
    keep = torch.arange(R, device=x.device) < ranks.to(x.device).index_select(0, adapter).view(T, K, 1)  # [T, K, R]
    A_sel = A.index_select(0, adapter).view(T, K, d_in, R).to(acc)
    h = torch.matmul(x.to(acc)[:, None, None, :], A_sel).view(T, K, R) * (coef[..., None] * keep)
    B_sel = B.index_select(0, adapter).view(T, K * R, d_out).to(acc)
    delta = torch.matmul(h.view(T, 1, K * R), B_sel).view(T, d_out)  # sum over slots inside the product
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
