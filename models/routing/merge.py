"""``merge``: every adapter at once, uniformly (MeteoRA's and DLP-LoRA's merging baseline).

    mode="delta"  (default) the average of the adapters' deltas, (1/L) sum_a s_a B_a A_a x; equals peft's
                  ``add_weighted_adapter(weights=[1/L]*L, combination_type="cat")``, and is computed as that one merged
                  slot of rank sum_a r_a (one kernel slot, not L; past MAX_MERGED_RANK as L slots of weight 1/L, the
                  same sum);
    mode="linear" peft's ``combination_type="linear"`` exactly: A' = sum_a c_a A_a, B' = sum_a c_a B_a with
                  c_a = sqrt(s_a / L) and scaling 1 (task arithmetic on A and B separately, so it has cross terms
                  B_a A_b; needs equal ranks, as peft does).
"""

from __future__ import annotations

import math

import torch

from models.adapter_bank import padded_rank
from models.routing.registry import strategy
from models.routing.route import Route, SequenceRouter

#: above this stacked rank (sum of the adapters' ranks) "delta" uses L routing slots of weight 1/L instead
MAX_MERGED_RANK = 128


@strategy("merge")
class MergeRouter(SequenceRouter):
    @staticmethod
    def check(adapters: list, mode: str = "delta") -> None:
        """Refuse an unknown mode (one ValueError line); the stages call it before a model loads."""
        if mode not in ("delta", "linear"):
            raise ValueError(f"merge mode={mode!r} is not known; use 'delta' (average of deltas) or 'linear' (peft's)")

    def __init__(self, ctx, mode: str = "delta"):
        super().__init__(ctx)
        self.check(ctx.bank, mode)
        self.mode = mode
        self._merged: dict = {}  # module name -> (cache key, merged one-slot tensors)
        self._one_slot = True

    def config(self):
        return {"mode": self.mode}

    def decide(self, input_ids, attention_mask, inputs_embeds):
        ref = input_ids if input_ids is not None else inputs_embeds
        B, L = ref.shape[0], len(self.ctx.bank)
        total = max(int(s.ranks.sum()) for s in self.ctx.bank.slots.values())
        self._one_slot = self.mode == "linear" or total <= MAX_MERGED_RANK
        if self._one_slot:
            return (torch.zeros(B, 1, dtype=torch.long, device=ref.device),
                    torch.ones(B, 1, dtype=torch.float32, device=ref.device))
        # too many adapters for one stacked slot: the same average as L routing slots of weight 1/L
        ids = torch.arange(L, device=ref.device).expand(B, L).contiguous()
        return ids, torch.full((B, L), 1.0 / L, dtype=torch.float32, device=ref.device)

    def route(self, module_name, x, state=None):
        r = super().route(module_name, x)  # shared by every projection of this forward: don't mutate it
        if not self._one_slot:
            return r
        return Route(r.ids, r.weights, r.seq_ids, self._merged_slot(module_name))

    @torch.no_grad()
    def _merged_slot(self, module_name):
        """The merged adapter of one projection as a one-slot bank (A [1, d_in, R'], B [1, R', d_out], scale, rank),
        rebuilt when the bank is swapped or its tensors are changed in place."""
        bank = self.ctx.bank
        A, B, scales, ranks = bank.tensors(module_name)
        key = (bank.version, A._version, B._version)
        hit = self._merged.get(module_name)
        if hit is None or hit[0] != key:
            hit = (key, self._linear(module_name, A, B, scales, ranks) if self.mode == "linear"
                   else self._cat(A, B, scales, ranks))
            self._merged[module_name] = hit
        return hit[1]

    def _cat(self, A, B, scales, ranks):
        """peft's "cat" with weights 1/L: ranks stacked side by side, so B'A' = (1/L) sum_a s_a B_a A_a exactly."""
        L = A.shape[0]
        cols = [A[a, :, : int(ranks[a])] * (float(scales[a]) / L) for a in range(L) if int(ranks[a]) > 0]
        rows = [B[a, : int(ranks[a])] for a in range(L) if int(ranks[a]) > 0]
        r = sum(c.shape[1] for c in cols)
        R = padded_rank(max(r, 1))
        A1 = A.new_zeros(1, A.shape[1], R)
        B1 = B.new_zeros(1, R, B.shape[2])
        if r:
            A1[0, :, :r] = torch.cat(cols, dim=1)
            B1[0, :r] = torch.cat(rows, dim=0)
        return A1, B1, scales.new_ones(1), torch.tensor([r], dtype=torch.int32, device=A.device)

    def _linear(self, module_name, A, B, scales, ranks):
        """peft's "linear" with weights 1/L: A' = sum_a c_a A_a, B' = sum_a c_a B_a, c_a = sqrt(s_a / L)."""
        L = A.shape[0]
        full = [int(r) for r in ranks if int(r) > 0]
        if len(set(full)) > 1:
            raise ValueError(f"merge mode='linear' needs equal ranks (as peft's linear merge); {module_name} has "
                             f"{sorted(set(full))}: use mode='delta'")
        r = full[0] if full else 1
        c = torch.sqrt(scales.double() / L).to(A.dtype)
        A1 = (c[:, None, None] * A).sum(0, keepdim=True)
        B1 = (c[:, None, None] * B).sum(0, keepdim=True)
        # peft gives the merged adapter lora_alpha = r: scaling 1, or sqrt(r) when the first adapter uses rsLoRA
        s = math.sqrt(r) if self.ctx.bank.use_rslora[0] else 1.0
        return A1, B1, torch.tensor([s], device=A.device), torch.tensor([r], dtype=torch.int32, device=A.device)
