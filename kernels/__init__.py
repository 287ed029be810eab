"""The fused multi-LoRA op that every loramux stage shares.

One call adds the routed LoRA deltas of an adapter bank to a base projection's output:

    out[t] = base[t] + sum_k w[t, k] * s[a] * (x[t] @ A[a, :, :r[a]]) @ B[a, :r[a], :],   a = ids[t, k]

``ids == -1`` marks an empty slot; any id outside [-1, L) is refused wherever the ids are on the host. Whatever
the bank holds (NaN and Inf included) in adapters a token does not route to, in the adapter an empty slot would
read, or past an adapter's rank never reaches that token's output or gradients (per token; per row tile on the
Triton bank path; see ``kernels.dense`` and README's Kernels section). Token routing (MeteoRA) passes ids/weights of shape [T, K]; sentence routing
(DLP-LoRA) passes per-sequence ids/weights [S, K] plus ``seq_ids`` [T] naming each token's sequence, so the
routing is never expanded per token. See ``kernels.reference`` for the readable definition.
``multi_lora_sequences`` takes sentence routing over a batch of sequences [S, L, d] and folds each sequence's
kept adapters into one concatenated adapter where that saves passes (``kernels.sequence_concat``);
``multi_lora_uniform`` is the op when one adapter, known on the host, serves every token (a plain LoRA;
``bank_uniform`` takes it as a bank index, and writes the bank's gradients directly while it trains);
``multi_lora_per_row`` is the oracle over a batch of several tasks (one adapter per row, weight 1: a joint
fine-tuning step) as two batched GEMMs;
``multi_lora_coef`` takes token routing as one [T, L] coefficient matrix (MeteoRA's gates while they train).
``expand_shrunk`` is the decode epilogue of a projection group whose base GEMM already computed every adapter's
shrink (and the gates' logits): the routing and the expand in one launch (``kernels.shrunk_expand``).
``gemv_lora`` is a uniform route's decode GEMV over such a packed weight with the LoRA in its epilogue: one launch
for base and adapter (``kernels.packed_gemv``).
"""

from kernels.coef import multi_lora_coef
from kernels.op import multi_lora
from kernels.packed_gemv import gemv_lora
from kernels.per_row import multi_lora_per_row
from kernels.sequence_concat import multi_lora_sequences
from kernels.shrunk_expand import expand_shrunk
from kernels.uniform import bank_uniform, multi_lora_uniform

__all__ = ["bank_uniform", "expand_shrunk", "gemv_lora", "multi_lora", "multi_lora_coef", "multi_lora_per_row",
           "multi_lora_sequences", "multi_lora_uniform"]
