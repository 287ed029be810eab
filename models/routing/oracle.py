"""``oracle``: the task is known, so sequence i uses adapter ``task_ids[i]`` with weight 1.

MeteoRA's "PEFT" column and DLP-LoRA's "single LoRA": the upper bound a router is measured against. It needs the
task of every prompt (``needs_task_ids``), so it cannot route composite prompts, which mix tasks.
"""

from __future__ import annotations

import torch

from models.routing.registry import strategy
from models.routing.route import SequenceRouter


@strategy("oracle")
class OracleRouter(SequenceRouter):
    keeps_decode_graph = True
    needs_task_ids = True
    one_adapter_per_row = True

    def decide(self, input_ids, attention_mask, inputs_embeds):
        ref = input_ids if input_ids is not None else inputs_embeds
        if self.ctx.task_ids is None:
            raise ValueError("router 'oracle' needs the task of every sequence: pass task_ids= (adapter names or "
                             "indices) to forward / generate, or call set_routing(task_ids=...)")
        ids = self.ctx.task_ids.to(ref.device).reshape(-1, 1)
        return ids, torch.ones(ids.shape, dtype=torch.float32, device=ref.device)

    def uniform_adapter(self):
        """Every sequence's task the same: that adapter. A one-adapter bank has no other (its task ids, on the host
        or on the device, can only say 0: nothing is read); otherwise read from the host copy of the task ids (None
        when they live on the device, as in a captured CUDA-graph step: reading them would synchronise)."""
        if self.ctx.bank is not None and len(self.ctx.bank) == 1:
            return 0
        t = self.ctx.task_ids
        if t is None or t.device.type != "cpu" or t.numel() == 0:
            return None
        return int(t[0]) if bool((t == t[0]).all()) else None
