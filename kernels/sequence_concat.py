"""Sentence routing with many kept adapters: each sequence's adapters folded into one concatenated adapter.

A sentence router (DLP-LoRA's top-p) gives every token of sequence s the same K (adapter, weight) pairs, so the K
deltas of a token are one low-rank product of rank K*R:

    sum_k w[s,k] s_a (x @ A_a) @ B_a  =  (x @ [A_a1 | ... | A_aK]) @ [w[s,1] s_a1 B_a1 ; ... ; w[s,K] s_aK B_aK]

For a prefill batch laid out as [S, L, d_in] (one row of the batch = one sequence) that is two batched matmuls:
one pass over x and one over the output whatever K is, where the grouped kernels make one expand pass per slot.
An untrained DLP router keeps ~0.6 n adapters (60 passes over every prefill projection at n = 100, measured at
459 ms against 29 ms for the base model on the 8B shape). The gathered copies of A and B cost S*K*(d_in + d_out)*R
elements per call, small next to prefill activations; decode (L = 1) stays on the token kernels, which take all
K slots in one launch. Plain torch, so autograd, torch.compile and every device come for free.

``multi_lora_sequences`` is the entry: the concatenated form where K >= SEQ_CONCAT_MIN_K, L >= SEQ_CONCAT_MIN_LEN and
the gathered copies stay under SEQ_CONCAT_MAX_BYTES (env LORAMUX_SEQ_CONCAT_MIN_K / _MIN_LEN / _MAX_BYTES; a huge
MIN_K turns it off), else ``kernels.multi_lora`` with seq_ids. The thresholds are a prediction (K passes of the
grouped kernels cost ~7 ms per slot on the 8B shape's 64 projections), not yet timed on a GPU.
"""

from __future__ import annotations

import os

import torch

from kernels.op import multi_lora

SEQ_CONCAT_MIN_K = int(os.environ.get("LORAMUX_SEQ_CONCAT_MIN_K", "3"))
SEQ_CONCAT_MIN_LEN = int(os.environ.get("LORAMUX_SEQ_CONCAT_MIN_LEN", "2"))
SEQ_CONCAT_MAX_BYTES = float(os.environ.get("LORAMUX_SEQ_CONCAT_MAX_BYTES", "256e6"))


def concat_sequence_adapters(A, B, scales, ranks, ids, weights, dtype):
    """Per sequence, its K kept adapters as one: ``A_seq [S, d_in, K*R]``, ``B_seq [S, K*R, d_out]``.

    Scale and fusion weight are folded into B_seq's rows; columns of A / rows of B past each adapter's rank and
    whole empty slots (id -1) are zeroed with ``where`` (not multiplied), so whatever the bank holds there,
    NaN included, never reaches the output.
    """
    S, K = ids.shape
    R = A.shape[2]
    dev = A.device
    valid = ids >= 0
    a = ids.clamp(min=0).long()
    keep = (torch.arange(R, device=dev) < ranks.to(dev)[a][..., None]) & valid[..., None]  # [S, K, R]
    acc = torch.promote_types(weights.dtype, torch.float32)  # fp32, or fp64 for fp64 inputs
    coef = torch.where(valid, weights.to(acc) * scales.to(dev, acc)[a], 0.0)  # [S, K]
    A_g = torch.where(keep[:, :, None, :], A[a], 0.0)  # [S, K, d_in, R]
    B_g = torch.where(keep[..., None], B[a], 0.0) * coef[..., None, None]  # [S, K, R, d_out]; mask first (NaN-safe grads)
    A_seq = A_g.permute(0, 2, 1, 3).reshape(S, A.shape[1], K * R).to(dtype)
    B_seq = B_g.reshape(S, K * R, B.shape[2]).to(dtype)
    return A_seq, B_seq


def multi_lora_per_sequence(x, base, A, B, scales, ranks, ids, weights):
    """``base + deltas`` for x [S, L, d_in], base [S, L, d_out] and per-sequence ids/weights [S, K]."""
    if x.dim() != 3 or base.shape[:2] != x.shape[:2] or ids.shape != (x.shape[0], ids.shape[1]):
        raise ValueError(f"multi_lora_per_sequence: x [S, L, d_in], base [S, L, d_out] and ids [S, K] expected, "
                         f"got {tuple(x.shape)} / {tuple(base.shape)} / {tuple(ids.shape)}")
    A_seq, B_seq = concat_sequence_adapters(A, B, scales, ranks, ids, weights, x.dtype)
    return base + torch.bmm(torch.bmm(x, A_seq), B_seq).to(base.dtype)


def use_sequence_concat(seq_len: int, k: int, gathered_bytes: float = 0.0) -> bool:
    return k >= SEQ_CONCAT_MIN_K and seq_len >= SEQ_CONCAT_MIN_LEN and gathered_bytes <= SEQ_CONCAT_MAX_BYTES


def multi_lora_sequences(x, base, A, B, scales, ranks, ids, weights, seq_ids=None):
    """Sentence routing over a batch whose rows are sequences: x [S, L, d_in], base [S, L, d_out], ids/weights
    [S, K]. The concatenated form (above) for wide nuclei at prefill, else ``multi_lora`` with ``seq_ids`` (token s*L
    + j belongs to sequence s; built here when not given)."""
    S, Lq = x.shape[0], x.shape[1]
    K, (_, d_in, R), d_out = ids.shape[1], A.shape, B.shape[2]
    gathered = S * K * (d_in + d_out) * R * x.element_size()
    if ids.shape[0] == S and use_sequence_concat(Lq, K, gathered):
        return multi_lora_per_sequence(x, base, A, B, scales, ranks, ids, weights)
    if seq_ids is None:
        seq_ids = torch.arange(S, device=x.device).repeat_interleave(Lq)
    return multi_lora(x, base, A, B, scales, ranks, ids, weights, seq_ids)
