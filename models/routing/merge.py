"""``merge``: every adapter at once, uniformly (MeteoRA's and DLP-LoRA's merging baseline).

    mode="delta"  (default) the average of the adapters' deltas, (1/L) sum_a s_a B_a A_a x; equals peft's
                  ``add_weighted_adapter(weights=[1/L]*L, combination_type="cat")``: the adapters' A side by side
                  (each scaled by s_a / L) and their B stacked, one LoRA of rank sum_a r_a;
    mode="linear" peft's ``combination_type="linear"`` exactly: A' = sum_a c_a A_a, B' = sum_a c_a B_a with
                  c_a = sqrt(s_a / L) and scaling 1 (task arithmetic on A and B separately, so it has cross terms
                  B_a A_b; needs equal ranks, as peft does).

Either way every row uses the same merged LoRA, so the layer runs it as a plain LoRA, two GEMMs
(``kernels.multi_lora_uniform``, via ``Route.lora``), whatever its rank: 28 adapters of rank 8 make rank 224,
which the routed kernels would have had to take as 28 routing slots per token of weight 1/28 (the form this
router used past a stacked rank of 128: an H200 evaluation of meteora_tasks did not finish it in 12 minutes while
LoRA-B, one adapter, took 4). The merged matrices are built once per projection, bank version and dtype.
"""

from __future__ import annotations

import math

import torch

from models.routing.registry import strategy
from models.routing.route import Route, SequenceRouter


@strategy("merge")
class MergeRouter(SequenceRouter):
    shares_route = False  # each projection gets its own merged LoRA (Route.lora)

    @staticmethod
    def check(adapters: list, mode: str = "delta") -> None:
        """Refuse an unknown mode (one ValueError line); the stages call it before a model loads."""
        if mode not in ("delta", "linear"):
            raise ValueError(f"merge mode={mode!r} is not known; use 'delta' (average of deltas) or 'linear' (peft's)")

    def __init__(self, ctx, mode: str = "delta"):
        super().__init__(ctx)
        self.check(ctx.bank, mode)
        self.mode = mode
        self._merged: dict = {}  # module name -> (cache key, (A' [d_in, r], B' [r, d_out], scale))

    def config(self):
        return {"mode": self.mode}

    def decide(self, input_ids, attention_mask, inputs_embeds):
        """One routing slot per row (slot 0, weight 1): what ``last_route`` reports; the layers read ``Route.lora``."""
        ref = input_ids if input_ids is not None else inputs_embeds
        B = ref.shape[0]
        return (torch.zeros(B, 1, dtype=torch.long, device=ref.device),
                torch.ones(B, 1, dtype=torch.float32, device=ref.device))

    def route(self, module_name, x, state=None):
        r = super().route(module_name, x)  # shared by every projection of this forward: don't mutate it
        return Route(r.ids, r.weights, r.seq_ids, lora=self._merged_lora(module_name, x.dtype))

    @torch.no_grad()
    def _merged_lora(self, module_name, dtype):
        """The merged adapter of one projection, ``(A' [d_in, r], B' [r, d_out], scale)`` in ``dtype``, rebuilt
        when the bank is swapped or its tensors are changed in place."""
        bank = self.ctx.bank
        A, B, scales, ranks = bank.tensors(module_name)
        key = (bank.version, A._version, B._version, dtype)
        hit = self._merged.get(module_name)
        if hit is None or hit[0] != key:
            A1, B1, s = (self._linear(module_name, A, B, scales, ranks) if self.mode == "linear"
                         else self._cat(A, B, scales, ranks))
            hit = (key, (A1.to(dtype).contiguous(), B1.to(dtype).contiguous(), s))
            self._merged[module_name] = hit
        return hit[1]

    def _cat(self, A, B, scales, ranks):
        """peft's "cat" with weights 1/L: ranks stacked side by side, so B'A' = (1/L) sum_a s_a B_a A_a exactly."""
        L = A.shape[0]
        used = [(a, int(ranks[a])) for a in range(L) if int(ranks[a]) > 0]
        if not used:  # no adapter touches this projection
            return A.new_zeros(A.shape[1], 0), B.new_zeros(0, B.shape[2]), 1.0
        A1 = torch.cat([A[a, :, :r] * (float(scales[a]) / L) for a, r in used], dim=1)
        B1 = torch.cat([B[a, :r] for a, r in used], dim=0)
        return A1, B1, 1.0

    def _linear(self, module_name, A, B, scales, ranks):
        """peft's "linear" with weights 1/L: A' = sum_a c_a A_a, B' = sum_a c_a B_a, c_a = sqrt(s_a / L)."""
        L = A.shape[0]
        full = [int(r) for r in ranks if int(r) > 0]
        if len(set(full)) > 1:
            raise ValueError(f"merge mode='linear' needs equal ranks (as peft's linear merge); {module_name} has "
                             f"{sorted(set(full))}: use mode='delta'")
        if not full:
            return A.new_zeros(A.shape[1], 0), B.new_zeros(0, B.shape[2]), 1.0
        r = full[0]
        c = torch.sqrt(scales.double() / L).to(A.dtype)
        A1 = (c[:, None, None] * A[:, :, :r]).sum(0)
        B1 = (c[:, None, None] * B[:, :r]).sum(0)
        # peft gives the merged adapter lora_alpha = r: scaling 1, or sqrt(r) when the first adapter uses rsLoRA
        return A1, B1, math.sqrt(r) if self.ctx.bank.use_rslora[0] else 1.0
