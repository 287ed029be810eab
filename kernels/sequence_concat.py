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

``multi_lora_sequences`` is the entry (``use_sequence_concat`` decides): on the torch backend (CPU, and training on
CUDA) the folded form at every prefill (L >= SEQ_CONCAT_MIN_LEN), whatever K (K = 1 is the oracle's / a joint
fine-tuning batch's route: two bmms, as cheap as one LoRA); on the Triton backend only for wide nuclei
(K >= SEQ_CONCAT_MIN_K); never when the gathered copies pass SEQ_CONCAT_MAX_BYTES (env LORAMUX_SEQ_CONCAT_MIN_K /
_MIN_LEN / _MAX_BYTES; a huge MIN_LEN turns folding off); else ``kernels.multi_lora`` with seq_ids. The Triton thresholds are a prediction (K passes
of the grouped kernels cost ~7 ms per slot on the 8B shape's 64 projections), not yet timed on a GPU.
"""

from __future__ import annotations

import os

import torch

from kernels.op import multi_lora, resolve_backend
from kernels.reference import check_ids
from kernels.route_tables import slot_coefficients

SEQ_CONCAT_MIN_K = int(os.environ.get("LORAMUX_SEQ_CONCAT_MIN_K", "3"))
SEQ_CONCAT_MIN_LEN = int(os.environ.get("LORAMUX_SEQ_CONCAT_MIN_LEN", "2"))
SEQ_CONCAT_MAX_BYTES = float(os.environ.get("LORAMUX_SEQ_CONCAT_MAX_BYTES", "256e6"))


def multi_lora_per_sequence(x, base, A, B, scales, ranks, ids, weights):
    """``base + deltas`` for x [S, L, d_in], base [S, L, d_out] and per-sequence ids/weights [S, K].

    Four products-and-selects per call, whatever K: gather the routed A and B (``A[a]``, ``B[a]``: only adapters
    that some sequence uses are read), ``h = x @ A_seq`` (one bmm), ``h`` scaled per column by w * s_a with the
    unused columns selected away, ``out = base + h @ B_seq`` (one baddbmm). Plain autograd: this is the training
    form of sentence routing (torch.compile fuses the selects into the products' neighbours)."""
    if x.dim() != 3 or base.shape[:2] != x.shape[:2] or ids.shape != (x.shape[0], ids.shape[1]):
        raise ValueError(f"multi_lora_per_sequence: x [S, L, d_in], base [S, L, d_out] and ids [S, K] expected, "
                         f"got {tuple(x.shape)} / {tuple(base.shape)} / {tuple(ids.shape)}")
    if ids.device.type == "cpu":  # on the host already: no sync (CUDA ids are in range by route construction)
        check_ids(ids, A.shape[0], "multi_lora_per_sequence")
    S, K = ids.shape
    (_, d_in, R), d_out = A.shape, B.shape[2]
    a, keep, coef = slot_coefficients(ids, weights, scales, ranks, R)  # [S, K], [S, K, R] x 2
    a = a.reshape(-1)  # index_select, whose backward is an index_add (advanced indexing's is a sorting index_put)
    A_seq = torch.where(keep[:, :, None, :], A.index_select(0, a).view(S, K, d_in, R), 0.0)
    A_seq = A_seq.permute(0, 2, 1, 3).reshape(S, d_in, K * R)
    B_seq = torch.where(keep.reshape(S, K * R, 1), B.index_select(0, a).view(S, K * R, d_out), 0.0)
    h = torch.bmm(x, A_seq.to(x.dtype))
    h = torch.where(keep.reshape(S, 1, K * R), h * coef.reshape(S, 1, K * R), 0.0)
    return torch.baddbmm(base, h.to(base.dtype), B_seq.to(base.dtype))


def use_sequence_concat(seq_len: int, k: int, gathered_bytes: float = 0.0, backend: str = "triton") -> bool:
    """Fold per sequence? The torch backend (CPU, training) always does at prefill (any K: the gathered form is
    then its cheapest, a plain bmm pair that autograd and torch.compile see through); the Triton kernels only for
    wide nuclei (K >= SEQ_CONCAT_MIN_K), where one pass beats K expand passes. Never past the gather budget."""
    if seq_len < SEQ_CONCAT_MIN_LEN or gathered_bytes > SEQ_CONCAT_MAX_BYTES:
        return False
    return backend == "torch" or k >= SEQ_CONCAT_MIN_K


def multi_lora_sequences(x, base, A, B, scales, ranks, ids, weights, seq_ids=None):
    """Sentence routing over a batch whose rows are sequences: x [S, L, d_in], base [S, L, d_out], ids/weights
    [S, K]. The concatenated form (above) at prefill where ``use_sequence_concat`` says so, else ``multi_lora``
    with ``seq_ids`` (token s*L + j belongs to sequence s; built here when not given)."""
    S, Lq = x.shape[0], x.shape[1]
    K, (_, d_in, R), d_out = ids.shape[1], A.shape, B.shape[2]
    gathered = S * K * (d_in + d_out) * R * x.element_size()
    if ids.shape[0] == S and use_sequence_concat(Lq, K, gathered, resolve_backend(x, base, A, B, weights)):
        return multi_lora_per_sequence(x, base, A, B, scales, ranks, ids, weights)
    if seq_ids is None:
        seq_ids = torch.arange(S, device=x.device).repeat_interleave(Lq)
    return multi_lora(x, base, A, B, scales, ranks, ids, weights, seq_ids)
