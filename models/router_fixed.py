"""The baselines of both papers: routers with nothing to learn.

``oracle``  the task is known: sequence i uses adapter ``task_ids[i]`` with weight 1 (the PEFT baseline).
``lora_b``  one adapter for every input (MeteoRA's LoRA-B, DLP-LoRA's joint LoRA): ``adapter=`` names it.
``merge``   all adapters at once, uniformly:
              mode="delta"  (default) the average of the adapters' deltas, (1/L) sum_a s_a B_a A_a x; equals
                            peft's ``add_weighted_adapter(weights=[1/L]*L, combination_type="cat")``;
              mode="linear" peft's ``combination_type="linear"`` exactly: A' = sum_a c_a A_a, B' = sum_a c_a B_a
                            with c_a = sqrt(s_a / L) and scaling 1 (task arithmetic on A and B separately, so it
                            has cross terms B_a A_b; needs equal ranks, as peft does).
``base``    no adapter at all.
"""

from __future__ import annotations

import math

import torch

from models.routing import Route, Router, SequenceRouter


class OracleRouter(SequenceRouter):
    name = "oracle"

    def decide(self, input_ids, attention_mask, inputs_embeds):
        ref = input_ids if input_ids is not None else inputs_embeds
        if self.ctx.task_ids is None:
            raise ValueError("router 'oracle' needs the task of every sequence: pass task_ids= (adapter names or "
                             "indices) to forward / generate, or call set_routing(task_ids=...)")
        ids = self.ctx.task_ids.to(ref.device).reshape(-1, 1)
        return ids, torch.ones(ids.shape, dtype=torch.float32, device=ref.device)


class SingleAdapterRouter(SequenceRouter):
    name = "lora_b"

    def __init__(self, ctx, adapter: str | None = None):
        super().__init__(ctx)
        if adapter is None:
            if len(ctx.bank) != 1:
                raise ValueError(f"router 'lora_b' needs adapter=<name> (one of {ctx.bank.names})")
            adapter = ctx.bank.names[0]
        ctx.bank.index(adapter)  # one-line KeyError if unknown
        self.adapter = adapter

    def config(self):
        return {"adapter": self.adapter}

    def decide(self, input_ids, attention_mask, inputs_embeds):
        ref = input_ids if input_ids is not None else inputs_embeds
        ids = torch.full((ref.shape[0], 1), self.ctx.bank.index(self.adapter), dtype=torch.long, device=ref.device)
        return ids, torch.ones(ids.shape, dtype=torch.float32, device=ref.device)


class MergeRouter(SequenceRouter):
    name = "merge"

    def __init__(self, ctx, mode: str = "delta"):
        super().__init__(ctx)
        if mode not in ("delta", "linear"):
            raise ValueError(f"merge mode={mode!r} is not known; use 'delta' (average of deltas) or 'linear' (peft's)")
        self.mode = mode
        self._merged: dict = {}
        self._merged_version = -1

    def config(self):
        return {"mode": self.mode}

    def decide(self, input_ids, attention_mask, inputs_embeds):
        ref = input_ids if input_ids is not None else inputs_embeds
        B, L = ref.shape[0], len(self.ctx.bank)
        if self.mode == "linear":
            return (torch.zeros(B, 1, dtype=torch.long, device=ref.device),
                    torch.ones(B, 1, dtype=torch.float32, device=ref.device))
        ids = torch.arange(L, device=ref.device).expand(B, L).contiguous()
        return ids, torch.full((B, L), 1.0 / L, dtype=torch.float32, device=ref.device)

    def route(self, module_name, x):
        r = super().route(module_name, x)  # shared by every projection of this forward: don't mutate it
        if self.mode == "linear":
            return Route(r.ids, r.weights, r.seq_ids, self._linear_merge(module_name))
        return r

    @torch.no_grad()
    def _linear_merge(self, module_name):
        bank = self.ctx.bank
        if self._merged_version != bank.version:
            self._merged, self._merged_version = {}, bank.version
        if module_name not in self._merged:
            A, B, scales, ranks = bank.tensors(module_name)
            L = len(bank)
            full = [int(r) for r in ranks if int(r) > 0]
            if len(set(full)) > 1:
                raise ValueError(f"merge mode='linear' needs equal ranks (as peft's linear merge); {module_name} has "
                                 f"{sorted(set(full))}: use mode='delta'")
            r = full[0] if full else 1
            c = torch.sqrt(scales.double() / L).to(A.dtype)
            A1 = (c[:, None, None] * A).sum(0, keepdim=True)
            B1 = (c[:, None, None] * B).sum(0, keepdim=True)
            # peft gives the merged adapter lora_alpha = r: scaling 1, or sqrt(r) when the first adapter uses rsLoRA
            s = math.sqrt(r) if bank.use_rslora[0] else 1.0
            self._merged[module_name] = (A1, B1, torch.tensor([s], device=A.device),
                                         torch.tensor([r], dtype=torch.int32, device=A.device))
        return self._merged[module_name]


class BaseRouter(Router):
    name = "base"
