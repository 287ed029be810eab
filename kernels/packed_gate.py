"""One GEMM for a projection whose gate learns: its base output, every adapter's shrink and the gate's logits.

    [y | h | logits] = x @ [W; A_cat^T; G]^T         W [d_out, d_in] frozen, A_cat [d_in, L*R] frozen, G [L, d_in]
    out = y + (h.view(T, L, R) * coef(logits)[:, :, None]).view(T, L*R) @ (s B_cat)        (kernels.coef)

Why. Training MeteoRA's gates over a frozen bank, each projection reads its input three times (the base GEMM, the
dense shrink over every adapter, the gate's [d_in, L] GEMM) and its backward writes three input gradients that
are then added (through W, through A_cat, through G). At SmolLM2's width (d_in 576, T = 16384 tokens a step at 64 x
256) each of those [T, d_in] passes costs about as much as the LoRA arithmetic it serves, and the gate's N = 28
GEMM runs far from the tensor cores' rate. Packed, the forward reads x once (one GEMM of N = d_out + L*R + L) and
the backward computes the input gradient as one GEMM of K = d_out + L*R + L, with nothing to add. vLLM packs
sibling projections' LoRA slices the same way at inference; here the packing is per projection and per step (the
gate changes every step, so the packed weight is a fresh concatenation per call: a copy of a few MB, small beside
the [T, *] passes it removes).

Gradients: only x's and G's (the base and the bank are frozen where this form is taken): ``dx = dY @ W_packed`` and
``dG = dlogits^T @ x``, not autograd's full ``dY^T @ x`` over the packed weight, which would cost as much as the
forward GEMM for rows that need none.

Precision: the GEMM runs in autocast's dtype where autocast is on (bf16 on the GPU trainer, as ``F.linear`` would),
else in x's dtype; the returned gradients take their inputs' dtypes. The packed form is the unpacked one's
arithmetic in another order of the same products (tests/test_packed_gate.py checks them equal in fp64).
"""

from __future__ import annotations

import torch

# the packed rows are padded with zero rows to a multiple of this: the product's row stride (and the input gradient
# GEMM's K) in 16-byte units for bf16. Unpadded (576 + 224 + 28 = 828 at SmolLM2's q_proj), cuBLAS left its fast
# Hopper kernels: the gates' step took 110 ms at batch 64 on the H200 against 78 ms unpacked (3934b2b)
ALIGN = 8


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


class _PackedGateGEMM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2, W, A_cat, G):
        dt = _compute_dtype(x2)
        xc = x2.to(dt)
        blocks = ([] if W is None else [W.to(dt)]) + [A_cat.t().to(dt), G.to(dt)]
        sizes = tuple(b.shape[0] for b in blocks)
        pad = -sum(sizes) % ALIGN
        packed = torch.cat([*blocks, G.new_zeros(pad, G.shape[1], dtype=dt)], 0)
        with torch.autocast(x2.device.type, enabled=False):
            y = torch.mm(xc, packed.t())  # [T, (d_out +) L*R + L + pad]
        ctx.save_for_backward(xc, packed)
        ctx.x_dtype, ctx.g_dtype, ctx.sizes = x2.dtype, G.dtype, (*sizes, pad)
        # views of the one product: their gradients come back apart (autograd would assemble the gradient of slices
        # taken outside as a zero fill and a copy per slice, and add them)
        return tuple(y.split(ctx.sizes, dim=1)[:len(sizes)])

    @staticmethod
    def backward(ctx, *grads):
        xc, packed = ctx.saved_tensors
        parts = [torch.zeros(xc.shape[0], n, dtype=packed.dtype, device=xc.device) if d is None else d.to(packed.dtype)
                 for d, n in zip((*grads, None), ctx.sizes, strict=True)]
        dx = torch.mm(torch.cat(parts, 1), packed).to(ctx.x_dtype) if ctx.needs_input_grad[0] else None
        dG = torch.mm(parts[-2].t(), xc).to(ctx.g_dtype) if ctx.needs_input_grad[3] else None
        return dx, None, None, dG


def packed_gate_gemm(x2: torch.Tensor, W: torch.Tensor | None, A_cat: torch.Tensor, G: torch.Tensor) -> tuple:
    """``x2 @ [W; A_cat^T; G]^T`` for x2 [T, d_in], W [d_out, d_in], A_cat [d_in, L*R], G [L, d_in], as its three
    column blocks ``(base [T, d_out] (no bias), h [T, L*R] (every adapter's shrink), logits [T, L])``, views of one
    product; W None: ``(h, logits)`` of ``x2 @ [A_cat^T; G]^T`` (the base GEMM left apart). Differentiable in x2 and
    G only (W and A_cat must be frozen: they get no gradient)."""
    if (W is not None and W.requires_grad) or A_cat.requires_grad:
        raise ValueError("packed_gate_gemm: the base weight and the bank must be frozen (they get no gradient here)")
    return _PackedGateGEMM.apply(x2, W, A_cat, G)
