"""The op when one adapter serves every token of the call, known on the host: a plain LoRA, two GEMMs.

    out = base + s * (x @ A[a, :, :r]) @ B[a, :r, :]        (``torch.add(base, mm, alpha=s)``)

A route is "uniform" when the router knows without reading the device that every row uses the same adapter with
weight 1: ``lora_b`` always, ``oracle`` when every sequence of the batch has the same task (always at batch 1, and
for a single-adapter bank). Then the op needs no routing metadata, no gather and no mask: the adapter's own
``[d_in, r]`` and ``[r, d_out]`` slices (views of the bank, rank padding excluded) go straight to cuBLAS / the CPU
BLAS, with the scale folded into the add of the base. Not ``addmm(base, ...)``: cuBLAS accumulates into its
output, so ATen first copies ``base`` there, a [T, d_out] device copy per call that nothing fuses (3% of a compiled
SmolLM2 training step on the H200), where the add fuses into the output's readers under torch.compile (rotary,
SiLU, the residual) and is one kernel eagerly. That is fewer launches than peft's unmerged LoRA (which adds dropout,
a separate scaling multiply and the add), and plain autograd, so torch.compile traces it and a
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
    out = torch.add(base.reshape(-1, base.shape[-1]), torch.mm(h.to(base.dtype), B_a.to(base.dtype)), alpha=scale)
    return out.reshape(*lead, out.shape[-1])


class _BankUniform(torch.autograd.Function):
    """``multi_lora_uniform`` on adapter ``a`` of a bank, with the bank's gradients written directly.

    Autograd differentiates ``A[a, :, :r]`` through a select and a slice: each builds a zeroed gradient of its
    input's shape and copies the smaller one into it, after a separate cast of the product to the bank's dtype, so
    every trained projection pays six small kernels per tensor. Here each of ``dA`` / ``dB`` is one zero fill of
    the bank's shape and one copy (cast included) of the adapter's product into its slice. The products, their
    order and their dtypes are autograd's own (``mm`` / ``addmm`` backward); the scale is each product's alpha
    instead of a multiply after it, the same bits where the scale is a power of two (LoRA's alpha / r, typically),
    else within a rounding of them.
    A bank of one adapter at the bank's rank (a trained bank is trimmed to it) gets the products themselves
    (``_into_bank``).
    """

    @staticmethod
    def forward(ctx, x2, base2, A, B, a: int, r: int, scale: float):
        A_a = A[a, :, :r].to(x2.dtype)
        h = torch.mm(x2, A_a)
        h_b = h.to(base2.dtype)
        B_a = B[a, :r].to(base2.dtype)
        ctx.save_for_backward(x2, A_a, h_b, B_a, A, B)
        ctx.a, ctx.r, ctx.scale, ctx.h_dtype = a, r, scale, h.dtype
        return torch.add(base2, torch.mm(h_b, B_a), alpha=scale)  # not addmm: the module docstring says why

    @staticmethod
    def backward(ctx, g):
        x2, A_a, h_b, B_a, A, B = ctx.saved_tensors
        a, r, s = ctx.a, ctx.r, ctx.scale
        need_x, need_base, need_A, need_B = ctx.needs_input_grad[:4]
        dx = dA = dB = None
        # the scale rides in each product's alpha (beta = 0: the input is shape only, never read), as in the
        # forward: a separate multiply would be one more kernel per product that torch.compile cannot fuse into
        # cuBLAS (7 a decoder layer, where peft scales the [T, d_out] gradient once)
        if need_B:
            dB = _into_bank(torch.addmm(B_a, h_b.t(), g, beta=0, alpha=s), B, (a, slice(0, r)))
        if need_x or need_A:
            dh = torch.addmm(h_b, g, B_a.t(), beta=0, alpha=s).to(ctx.h_dtype)
            if need_x:
                dx = torch.mm(dh, A_a.t())
            if need_A:
                dA = _into_bank(torch.mm(x2.t(), dh), A, (a, slice(None), slice(0, r)))
        return dx, (g if need_base else None), dA, dB, None, None, None


def _into_bank(grad_a: torch.Tensor, bank: torch.Tensor, where: tuple) -> torch.Tensor:
    """The bank-shaped gradient holding ``grad_a`` at ``bank[where]`` and zeros elsewhere. Where the slice is the
    whole bank (a bank of one adapter at the bank's rank: a bank that trains is trimmed to its adapters' rank,
    ``AdapterBank.fit_rank_to_adapters``) it is ``grad_a`` itself, cast to the bank's dtype: no zero fill and no
    copy (two kernels per trained tensor and projection in eager mode, one that compiled layers still ran)."""
    if bank.shape[0] == 1 and grad_a.shape == bank.shape[1:]:
        return grad_a.to(bank.dtype).unsqueeze(0)
    out = torch.zeros_like(bank)
    out[where].copy_(grad_a)
    return out


def bank_uniform(x: torch.Tensor, base: torch.Tensor, A: torch.Tensor, B: torch.Tensor, a: int, r: int,
                 scale: float) -> torch.Tensor:
    """``base + scale * (x @ A[a, :, :r]) @ B[a, :r]`` for a bank A [L, d_in, R], B [L, R, d_out].

    The same as ``multi_lora_uniform`` on the adapter's slices; while the bank trains (A or B requires grad, grad
    mode on) its gradients come from ``_BankUniform``, written straight into bank-shaped tensors."""
    if r == 0:
        return base
    if not (torch.is_grad_enabled() and (A.requires_grad or B.requires_grad)):
        return multi_lora_uniform(x, base, A[a, :, :r], B[a, :r], scale)
    lead = base.shape[:-1]
    out = _BankUniform.apply(x.reshape(-1, x.shape[-1]), base.reshape(-1, base.shape[-1]), A, B, a, r, scale)
    return out.reshape(*lead, out.shape[-1])
