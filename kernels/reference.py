"""Plain-torch reference of the multi-LoRA op: readable first, it defines the semantics.

Loops over adapters and routing slots, gathers the tokens routed to each, and ``index_add``s their deltas.
Differentiable by ordinary autograd in every input (x, A, B, weights), so it is also the CPU path and the
float64 oracle that the Triton kernels are tested against.

What never reaches a token's output or any gradient, whatever the bank holds there (NaN and Inf included): the
adapters that token does not route to, its empty slots (id -1) and the columns of A / rows of B past an adapter's
rank. The loop reads only the routed tokens' adapters, sliced to their rank, so this holds per token by
construction. Adapter ids are -1 (empty) or in [0, L); anything else is refused (``check_ids``).
"""

from __future__ import annotations

import torch


def expand_sequence_routing(ids: torch.Tensor, weights: torch.Tensor, seq_ids: torch.Tensor | None):
    """Per-sequence routing [S, K] + seq_ids [T] -> per-token routing [T, K] (identity for token routing)."""
    if seq_ids is None:
        return ids, weights
    return ids.index_select(0, seq_ids), weights.index_select(0, seq_ids)


def check_ids(ids: torch.Tensor, L: int, where: str = "multi_lora") -> None:
    """One ``ValueError`` line when an adapter id is outside [-1, L) (-1 = empty slot); reads ``ids`` on the host,
    so callers use it only where ``ids`` already live there (a CUDA tensor would cost a device sync). Not while
    torch.compile traces (a read would break the graph): compiled models take their routes from the routers,
    which build ids in range."""
    if ids.numel() == 0 or torch.compiler.is_compiling():
        return
    lo, hi = torch.aminmax(ids)
    if int(lo) < -1 or int(hi) >= L:
        bad = ids[(ids < -1) | (ids >= L)].unique()[:5].tolist()
        raise ValueError(f"{where}: adapter ids {bad} are outside [-1, {L}) for a bank of {L} adapters (-1 marks an "
                         "empty slot); route only to adapters the bank holds")


def multi_lora_reference(
    x: torch.Tensor,  # [T, d_in]
    base: torch.Tensor,  # [T, d_out], output of the frozen base projection
    A: torch.Tensor,  # [L, d_in, R]
    B: torch.Tensor,  # [L, R, d_out]
    scales: torch.Tensor,  # [L] alpha / r per adapter
    ranks: torch.Tensor,  # [L] int, r_a <= R; columns past r_a are ignored
    ids: torch.Tensor,  # [T, K] or [S, K] int, -1 = empty slot
    weights: torch.Tensor,  # same shape as ids
    seq_ids: torch.Tensor | None = None,  # [T] int sequence index of each token, for sentence routing
) -> torch.Tensor:
    """Return ``base`` plus the routed LoRA deltas; accumulates in fp32 (or fp64 for fp64 inputs)."""
    check_ids(ids, A.shape[0], "multi_lora_reference")
    ids, weights = expand_sequence_routing(ids, weights, seq_ids)
    acc_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    out = base.to(acc_dtype)
    xa = x.to(acc_dtype)
    for a in range(A.shape[0]):
        r = int(ranks[a])
        if r == 0:
            continue
        for k in range(ids.shape[1]):
            tok = (ids[:, k] == a).nonzero().squeeze(1)
            if tok.numel() == 0:
                continue
            h = xa[tok] @ A[a, :, :r].to(acc_dtype)
            delta = (h @ B[a, :r, :].to(acc_dtype)) * (
                scales[a].to(acc_dtype) * weights[tok, k, None].to(acc_dtype)
            )
            out = out.index_add(0, tok, delta)
    return out.to(base.dtype)
