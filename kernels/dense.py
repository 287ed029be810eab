"""Vectorised torch path of the multi-LoRA op (the CPU default): three dense products, no Python loop.

    h     = x @ [A_0 | A_1 | ... | A_{L-1}]                       [T, L*R]  every adapter's shrink at once
    h    *= C  where C[t, a*R + j] = s_a * sum_k [ids[t,k] == a] * w[t,k] * [j < r_a]   (routing as a mask)
    out   = base + h @ [B_0; B_1; ...; B_{L-1}]                   [T, d_out]

It does L/K times the FLOPs of the routed computation, which is cheap for the few small adapters of CPU training
and far faster than the reference's loop; plain autograd differentiates it in x, A, B and weights.
"""

from __future__ import annotations

import torch


def multi_lora_dense(x, base, A, B, scales, ranks, ids, weights) -> torch.Tensor:
    """Same contract as ``kernels.reference.multi_lora_reference`` with token routing ids/weights [T, K]."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    T = x.shape[0]
    L, d_in, R = A.shape
    valid = ids >= 0
    adapter = torch.where(valid, ids, torch.zeros_like(ids)).long()
    coef = torch.where(
        valid, weights.to(acc) * scales.to(acc)[adapter], torch.zeros((), dtype=acc, device=x.device)
    )
    per_adapter = torch.zeros(T, L, dtype=acc, device=x.device).scatter_add(1, adapter, coef)  # [T, L]
    rank_mask = torch.arange(R, device=x.device)[None, :] < ranks.to(x.device)[:, None]  # [L, R]
    h = x.to(acc) @ A.to(acc).permute(1, 0, 2).reshape(d_in, L * R)
    h = h * (per_adapter[:, :, None] * rank_mask).reshape(T, L * R)
    return (base.to(acc) + h @ B.to(acc).reshape(L * R, -1)).to(base.dtype)
