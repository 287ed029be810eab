"""The op when each row of a batch is one sequence with one adapter of its own, weight 1: two batched GEMMs.

    out[s] = base[s] + scale * (x[s] @ A[a_s, :, :r]) @ B[a_s, :r, :]        x [S, T, d_in], rows a [S]

This is the oracle over a batch of several tasks, which is what a joint fine-tuning step is: every adapter of an
experiment trained at once, each row of the batch routed to its own task's adapter. When every adapter of the bank
has the same rank r and scale at this projection (one LoRA config for all tasks, as a joint fine-tuning has), the
routed adapters are gathered and cut to that rank (the rank padding is never read, so whatever it holds stays out),
and the delta is two ``bmm`` added to the base with the scale as the add's alpha (not ``baddbmm(base, ...)``,
which copies the base into its output first: ``kernels.uniform`` says why): no per-slot masks, no coefficients, no
per-projection routing tables. The general sentence form (``kernels.sequence_concat``) masks the padding and scales
per column for any mix of ranks, weights and K; here K = 1 with weight 1 makes all of that unnecessary.

While the bank trains, ``_PerRow``'s backward computes autograd's own products (the ``bmm`` / scaled add backward,
same order and dtypes; the scale as each product's alpha, not a multiply after it: the same bits where the scale
is a power of two, else within a rounding) and writes each bank gradient as one zero fill of the bank's shape plus
one ``index_add_`` of the rows' gradients into the adapters' slices, where autograd through the gather and the cut
builds two zeroed tensors and a cast. Rows that share an adapter add up in its gradient, as they must.
"""

from __future__ import annotations

import torch

from kernels.reference import check_ids


def _gather(A: torch.Tensor, B: torch.Tensor, rows: torch.Tensor, r: int, x_dtype, out_dtype):
    return A.index_select(0, rows)[:, :, :r].to(x_dtype), B.index_select(0, rows)[:, :r].to(out_dtype)


class _PerRow(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, base, A, B, rows, r: int, scale: float):
        A_s, B_s = _gather(A, B, rows, r, x.dtype, base.dtype)
        h = torch.bmm(x, A_s)
        h_b = h.to(base.dtype)
        ctx.save_for_backward(x, A_s, h_b, B_s, rows, A, B)
        ctx.r, ctx.scale, ctx.h_dtype = r, scale, h.dtype
        # the add, not baddbmm(base, ...), which first copies base into its output (kernels.uniform's _BankUniform)
        return torch.add(base, torch.bmm(h_b, B_s), alpha=scale)

    @staticmethod
    def backward(ctx, g):
        x, A_s, h_b, B_s, rows, A, B = ctx.saved_tensors
        r, s = ctx.r, ctx.scale
        need_x, need_base, need_A, need_B = ctx.needs_input_grad[:4]
        dx = dA = dB = None
        if need_B:
            dB = torch.zeros_like(B)
            # the scale in each product's alpha (beta = 0: the input gives the shape only), no multiply after it
            dB[:, :r].index_add_(0, rows, torch.baddbmm(B_s, h_b.transpose(1, 2), g, beta=0, alpha=s).to(dB.dtype))
        if need_x or need_A:
            dh = torch.baddbmm(h_b, g, B_s.transpose(1, 2), beta=0, alpha=s).to(ctx.h_dtype)
            if need_x:
                dx = torch.bmm(dh, A_s.transpose(1, 2))
            if need_A:
                dA = torch.zeros_like(A)
                dA[:, :, :r].index_add_(0, rows, torch.bmm(x.transpose(1, 2), dh).to(dA.dtype))
        return dx, (g if need_base else None), dA, dB, None, None, None


def multi_lora_per_row(x: torch.Tensor, base: torch.Tensor, A: torch.Tensor, B: torch.Tensor, rows: torch.Tensor,
                       r: int, scale: float) -> torch.Tensor:
    """``base + scale * (x @ A[rows, :, :r]) @ B[rows, :r]`` per row: x [S, T, d_in], base [S, T, d_out], rows [S]
    (adapter index of each row, in range), A [L, d_in, R], B [L, R, d_out]; ``r`` and ``scale`` (host) shared by
    every adapter. r = 0 returns ``base``."""
    if x.dim() != 3 or base.shape[:2] != x.shape[:2] or rows.shape != (x.shape[0],):
        raise ValueError(f"multi_lora_per_row: x [S, T, d_in], base [S, T, d_out] and rows [S] expected, got "
                         f"{tuple(x.shape)} / {tuple(base.shape)} / {tuple(rows.shape)}")
    if rows.device.type == "cpu":  # on the host already: no sync (CUDA rows are in range by route construction)
        check_ids(rows, A.shape[0], "multi_lora_per_row")
    if r == 0:
        return base
    if torch.is_grad_enabled() and (A.requires_grad or B.requires_grad):
        return _PerRow.apply(x, base, A, B, rows, r, scale)
    A_s, B_s = _gather(A, B, rows, r, x.dtype, base.dtype)
    return torch.add(base, torch.bmm(torch.bmm(x, A_s).to(base.dtype), B_s), alpha=scale)
