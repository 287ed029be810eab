"""The op when one adapter serves every token of the call, known on the host: a plain LoRA, two GEMMs.

    out = base + s * (x @ A[a, :, :r]) @ B[a, :r, :]        (``torch.addmm`` with alpha = s)

A route is "uniform" when the router knows without reading the device that every row uses the same adapter with
weight 1: ``lora_b`` always, ``oracle`` when every sequence of the batch has the same task (always at batch 1, and
for a single-adapter bank). Then the op needs no routing metadata, no gather and no mask: the adapter's own
``[d_in, r]`` and ``[r, d_out]`` slices (views of the bank, rank padding excluded) go straight to cuBLAS / the CPU
BLAS, with the scale folded into the second product's epilogue. That is fewer launches than peft's unmerged LoRA
(which adds dropout, a separate scaling multiply and the add), and plain autograd, so torch.compile traces it and a
training step differentiates A and B through the views into the bank's stacked tensors. ``MultiLoRALinear`` takes
this form for a uniform route on the Triton backend too (CUDA inference: decode and prefill), where the routed
kernels would add routing gathers and a split-K partial buffer to the same two products; for a bank held in
another dtype than the activations it casts the bank once (``kernels.cast_cache``), not per call.
"""

from __future__ import annotations

import torch


def multi_lora_uniform(x: torch.Tensor, base: torch.Tensor, A_a: torch.Tensor, B_a: torch.Tensor,
                       scale: float) -> torch.Tensor:
    """``base + scale * (x @ A_a) @ B_a`` for x [..., d_in], base [..., d_out], A_a [d_in, r], B_a [r, d_out].

    ``scale`` is a host float (the bank keeps host copies), so it rides in the GEMM's alpha at no extra launch.
    r = 0 (the adapter does not touch this projection) returns ``base``."""
    if A_a.shape[1] == 0:
        return base
    lead = base.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    h = torch.mm(x2, A_a.to(x2.dtype))
    out = torch.addmm(base.reshape(-1, base.shape[-1]), h.to(base.dtype), B_a.to(base.dtype), alpha=scale)
    return out.reshape(*lead, out.shape[-1])
