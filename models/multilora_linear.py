"""MultiLoRALinear: a frozen base ``nn.Linear`` plus the routed deltas of every adapter in the bank.

    y = base(x) + sum_k w_k * s_a * (x @ A_a) @ B_a        computed by ``kernels.multi_lora`` in one call

The layer owns no adapter weights: it reads its projection's stacked ``(A, B, scales, ranks)`` from the shared
``AdapterBank`` on every call (so hot swaps need no rewiring) and asks the current router (``ctx.router``) for
the route; ``None`` (the ``base`` strategy) returns the base output untouched. There is no per-adapter Python loop
here: selection is data (``ids``/``weights``), compute is the kernel.
"""

from __future__ import annotations

import torch
from torch import nn

from kernels import multi_lora, multi_lora_sequences, multi_lora_uniform
from kernels.op import resolve_backend


class MultiLoRALinear(nn.Module):
    def __init__(self, base_layer: nn.Linear, module_name: str, ctx):
        super().__init__()
        self.base_layer = base_layer
        self.module_name = module_name
        object.__setattr__(self, "ctx", ctx)  # shared RouteContext (holds bank and router), not a submodule

    # what HF code may read off a projection
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self):
        return self.base_layer.bias

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        router = self.ctx.router
        route = router.route(self.module_name, x) if router is not None else None
        if route is None or len(self.ctx.bank) == 0:
            return y
        bank = self.ctx.bank
        A, B, scales, ranks = route.tensors or bank.tensors(self.module_name)
        if route.tensors is None and resolve_backend(x, A, B, route.weights) == "torch":
            a = route.uniform
            if a is not None:  # one adapter for every row, known on the host: a plain LoRA on its slices of the bank
                r, s = bank.host_rank_scale(self.module_name, a)
                return multi_lora_uniform(x, y, A[a, :, :r], B[a, :r], s)
            A, B, scales, ranks = bank.tight_tensors(self.module_name)  # no rank padding in the torch forms
            if A.shape[2] == 0:
                return y
        if route.seq_ids is not None and x.dim() == 3 and route.ids.shape[0] == x.shape[0]:
            # sentence routing, one sequence per batch row: wide nuclei at prefill take the concatenated form
            return multi_lora_sequences(x, y, A, B, scales, ranks, route.ids, route.weights, route.seq_ids)
        return multi_lora(x, y, A, B, scales, ranks, route.ids, route.weights, route.seq_ids)

    def extra_repr(self) -> str:
        return f"{self.module_name}, adapters={len(self.ctx.bank)}"
