"""``lora_b``: one adapter for every input (MeteoRA's LoRA-B, DLP-LoRA's joint LoRA); ``adapter=`` names it.

A LoRA-B adapter is just another adapter (finetune ``task=lora_b`` trains it on every task mixed); this strategy
applies one adapter of the bank to every sequence. Without ``adapter=`` the bank must hold exactly one.
"""

from __future__ import annotations

import torch

from models.routing.registry import strategy
from models.routing.route import SequenceRouter


@strategy("lora_b")
class SingleAdapterRouter(SequenceRouter):
    keeps_decode_graph = True

    @staticmethod
    def check(adapters: list, adapter: str | None = None) -> None:
        """Refuse an adapter the bank will not hold (one ValueError line); the stages call it before a model loads."""
        if adapter is None and len(adapters) != 1:
            raise ValueError(f"router 'lora_b' needs adapter=<name> (one of {list(adapters)})")
        if adapter is not None and adapter not in adapters:
            raise ValueError(f"router 'lora_b': adapter {adapter!r} is not among the adapters {list(adapters)}; "
                             f"name one of them")

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

    def uniform_adapter(self):
        return self.ctx.bank.index(self.adapter)
