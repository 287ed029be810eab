"""The op with the routing given as one [T, L] matrix: each token's weight on each adapter, 0 where not routed.

    out[t] = base[t] + sum_a coef[t, a] * s_a * (x[t] @ A[a, :, :r_a]) @ B[a, :r_a, :]      (over a with coef != 0)

Why a second way to pass a route. MeteoRA's gates choose top-k adapters per token and projection; as ids/weights
[T, K] they must be turned back into per-(token, adapter) coefficients by the dense form (``kernels.dense``: two
scatters, a mask, selects), about twenty small ops per projection call on top of the two products, and as many
again in the backward. Training the gates runs that at every one of SmolLM2's 210 projections per step, so the op
count, not the arithmetic, sets the step time (host launches in eager mode, kernels in a CUDA graph). The gate can
instead write its top-k softmax straight into a [T, L] zero matrix (``torch.zeros().scatter``: one op), and the
products need only ``coef * s`` where routed (the router builds the matrix: ``kernels.gate_mix.top_k_coef``):

    h   = (x @ A_cat).view(T, L, R) * coef[:, :, None]               A_cat [d_in, L*R], B_cat [L*R, d_out]
    out = base + h.view(T, L*R) @ (s B_cat)                          each adapter's rows of B_cat times its s_a

Plain autograd differentiates it in x, A, B and ``coef`` (the gates learn through the scatter), torch.compile
traces it, and nothing is read back to the host. The gradient in ``coef`` is the dense function's, defined at every
entry (an adapter's contribution had its coefficient been non-zero); a route built by a scatter reads it only at
the routed entries, where it is the definition's.

Non-finite adapters. ``A_cat`` / ``B_cat`` are the bank with every column past a rank or holding a non-finite value
set to zero (``kernels.dense.bank_matrices``, cached while the bank is frozen), so a finite token's ``h`` is
finite and an adapter it does not route to contributes exactly 0 to its output and gradients, whatever that adapter
holds. A token routed to an adapter with such a column (coef != 0) gets NaN in its coefficient for it, hence a NaN
output row, as the reference gives NaN there: its own adapter is broken. (That select is skipped for a frozen bank
known to have no such column: ``bank_known_clean``.)

While the gates learn over a frozen bank, a projection computes its base output, the shrink ``h`` and its gate's
logits in one GEMM (``multi_lora_coef_packed``, ``kernels.packed_gate``) and the rest as here (``weighted_expand``).

``multi_lora_coef_reference`` is the readable definition (a loop over adapters, each on the tokens routed to it).
"""

from __future__ import annotations

import torch

from kernels.dense import bank_matrices, compute_dtype
from kernels.derived_cache import kept_when_frozen
from kernels.gate_mix import TopKGate, mix_coef
from kernels.packed_gate import packed_gate_gemm


def multi_lora_coef(x: torch.Tensor, base: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scales: torch.Tensor,
                    ranks: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """``base`` plus the LoRA deltas weighted by ``coef`` [T, L] (or a ``TopKGate``: its route; T = prod of x's
    leading dims); x [..., d_in],
    base [..., d_out], A [L, d_in, R], B [L, R, d_out], scales / ranks [L]. On CUDA the products run in the
    activations' dtype (autocast casts them as any matmul), on the CPU in fp32 (fp64 for fp64)."""
    lead = base.shape[:-1]
    x2, b2 = x.reshape(-1, x.shape[-1]), base.reshape(-1, base.shape[-1])
    T, L = x2.shape[0], A.shape[0]
    shape = tuple((coef.logits if isinstance(coef, TopKGate) else coef).shape)
    if shape != (T, L):
        raise ValueError(f"multi_lora_coef: coef has shape {shape}, expected [tokens, adapters] = [{T}, {L}]")
    acc = compute_dtype(x2)
    A_cat, B_cat, broken = bank_matrices(A, B, ranks)
    out = weighted_expand(b2, x2.to(acc) @ A_cat.to(acc), coef, A, B, ranks, scales, B_cat, broken, acc)
    return out.to(base.dtype).reshape(*lead, out.shape[-1])


def weighted_expand(b2: torch.Tensor, h: torch.Tensor, coef: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                    ranks: torch.Tensor, scales: torch.Tensor, B_cat: torch.Tensor, broken: torch.Tensor,
                    acc: torch.dtype) -> torch.Tensor:
    """``b2 + (h * coef per adapter) @ (s B_cat)`` for the shrink ``h`` [T, L*R] (every adapter's, from
    ``x @ A_cat`` or the packed GEMM of ``kernels.packed_gate``), ``coef`` [T, L] or a ``kernels.gate_mix.TopKGate``
    (its route and CE computed with the multiply, one kernel each way), in ``acc``."""
    T, (L, _, R) = h.shape[0], A.shape
    if isinstance(coef, TopKGate):  # the gate's logits and rule: route, NaN select and multiply in one kernel
        hc = coef.mix(h.to(acc), broken, R)
    else:  # routed to a broken adapter: NaN, that token only (no select where the bank is known clean)
        hc = mix_coef(h, coef, broken, R, acc, select=not bank_known_clean(A, B, ranks, broken))
    # base + product as an add, not addmm(base, ...): addmm copies base into its output first (a device copy per
    # call); the add fuses into the output's readers under torch.compile
    return torch.add(b2.to(acc), torch.mm(hc.view(T, L * R), scaled_expand(B_cat, scales, R, acc)))


def multi_lora_coef_packed(x: torch.Tensor, base_layer: torch.nn.Linear, A: torch.Tensor, B: torch.Tensor,
                           scales: torch.Tensor, ranks: torch.Tensor, gate: torch.Tensor, route,
                           with_base: bool = True) -> torch.Tensor:
    """``multi_lora_coef`` on ``base_layer(x)`` with the coefficients of a gate that learns: the base output
    (``with_base``; else ``base_layer`` runs apart), every adapter's shrink and the gate's logits ``x @ gate^T`` in
    one GEMM (``kernels.packed_gate``), then ``route(logits)`` -> coef [T, L] (the router's rule and its losses),
    then the weighted expand. Base layer and bank frozen."""
    lead, d_out = x.shape[:-1], base_layer.out_features
    x2 = x.reshape(-1, x.shape[-1])
    A_cat, B_cat, broken = bank_matrices(A, B, ranks)
    if with_base:
        b2, h, logits = packed_gate_gemm(x2, base_layer.weight, A_cat, gate)
        if base_layer.bias is not None:
            b2 = b2 + base_layer.bias.to(b2.dtype)
    else:
        h, logits = packed_gate_gemm(x2, None, A_cat, gate)
        b2 = base_layer(x2)
    out = weighted_expand(b2, h, route(logits), A, B, ranks, scales, B_cat, broken, b2.dtype)
    return out.reshape(*lead, d_out)


def scaled_expand(B_cat: torch.Tensor, scales: torch.Tensor, R: int, dtype: torch.dtype) -> torch.Tensor:
    """``B_cat`` [L*R, d_out] with adapter a's R rows times its scale s_a, in ``dtype``: the scales ride in the
    expand's weight, not in a per-token multiply (one op fewer forward and backward per projection call). Kept per
    (B_cat, scales, dtype) while nothing differentiates B (``kernels.derived_cache``: a frozen bank's ``B_cat`` is
    itself kept per bank version); a bank that trains (or a compile) computes it per call."""
    def build():
        return (B_cat * scales.to(B_cat.device, B_cat.dtype).repeat_interleave(R)[:, None]).to(dtype)

    return kept_when_frozen(("scaled_expand", dtype), (B_cat, scales), build, trains=B_cat.requires_grad,
                            otherwise=build)


def bank_known_clean(A: torch.Tensor, B: torch.Tensor, ranks: torch.Tensor, broken: torch.Tensor) -> bool:
    """True when no adapter has a non-finite column below its rank and that is known without a device read on
    every call: the bank is frozen (the answer is then kept per bank version, ``kernels.derived_cache``; reading it
    the first time is one host read per version), not under torch.compile, and during a CUDA graph capture only
    when the answer was kept before. False means "not known": the caller keeps the device-side select."""
    return kept_when_frozen(("bank_clean",), (A, B, ranks), lambda: not bool(broken.any()),
                            trains=A.requires_grad or B.requires_grad, otherwise=lambda: False)


def multi_lora_coef_reference(x: torch.Tensor, base: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                              scales: torch.Tensor, ranks: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """The definition: for each adapter, its LoRA on the tokens with a non-zero coefficient for it, weighted and
    added; fp32 accumulation (fp64 for fp64 inputs)."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    lead = base.shape[:-1]
    if isinstance(coef, TopKGate):
        coef = coef.dense()
    x2, out = x.reshape(-1, x.shape[-1]).to(acc), base.reshape(-1, base.shape[-1]).to(acc)
    for a in range(A.shape[0]):
        r = int(ranks[a])
        tok = (coef[:, a] != 0).nonzero().squeeze(1)
        if r == 0 or tok.numel() == 0:
            continue
        delta = (x2[tok] @ A[a, :, :r].to(acc)) @ B[a, :r].to(acc)
        out = out.index_add(0, tok, delta * (scales[a].to(acc) * coef[tok, a, None].to(acc)))
    return out.to(base.dtype).reshape(*lead, out.shape[-1])
