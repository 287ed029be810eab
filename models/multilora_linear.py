"""MultiLoRALinear: a frozen base ``nn.Linear`` plus the routed deltas of every adapter in the bank.

    y = base(x) + sum_k w_k * s_a * (x @ A_a) @ B_a        computed by ``kernels.multi_lora`` in one call

The layer owns no adapter weights: it reads its projection's stacked ``(A, B, scales, ranks)`` from the shared
``AdapterBank`` on every call (so hot swaps need no rewiring) and asks the current router (``ctx.router``) for
the route; ``None`` (the ``base`` strategy) returns the base output untouched. There is no per-adapter Python loop
here: selection is data (``ids``/``weights``, or a [T, L] ``coef`` matrix while gates learn), compute is the kernel.
"""

from __future__ import annotations

import torch
from torch import nn

from kernels import (
    bank_uniform,
    cast_cache,
    multi_lora,
    multi_lora_coef,
    multi_lora_per_row,
    multi_lora_sequences,
    multi_lora_uniform,
)
from kernels.coef import multi_lora_coef_packed, multi_lora_coef_reference
from kernels.op import resolve_backend
from models.adapter_bank import slot_key
from models.wrapped_linear import WrappedLinear


class MultiLoRALinear(WrappedLinear):
    def __init__(self, base_layer: nn.Linear, module_name: str, ctx):
        super().__init__(base_layer)
        self.module_name = module_name
        object.__setattr__(self, "ctx", ctx)  # shared RouteContext (holds bank and router), not a submodule
        # This projection's stacked adapters and its router's per-projection module (MeteoRA's gate), held by
        # reference, not looked up by name: torch.compile of one decoder layer then serves every layer (a name used
        # as a key would specialise the compiled graph to each layer). Not submodules: the bank and router own them.
        object.__setattr__(self, "slots", ctx.bank.slots[slot_key(module_name)])
        object.__setattr__(self, "route_state", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.group_output(x)  # grouped: the leader computes the group, the others take their share of it
        if out is not None:
            return out
        router = self.ctx.router
        if router is not None and (gate := router.packed_gate(self.route_state)) is not None:
            out = self._packed_gate(x, router, gate)
            if out is not None:
                return out
        y = self.base_layer(x)
        route = router.route(self.module_name, x, self.route_state) if router is not None else None
        if route is None or len(self.ctx.bank) == 0:
            return y
        slots = self.slots
        if route.per_token is not None:  # token routes as one [T, L] matrix or gate (gates that learn): dense form
            A, B = slots.tight()
            coef_op = multi_lora_coef_reference if resolve_backend(x, A, B) == "reference" else multi_lora_coef
            return coef_op(x, y, A, B, slots.scales, slots.ranks, route.per_token)
        if route.lora is not None:  # the router's own plain LoRA for every row (merge): two GEMMs, any rank
            return multi_lora_uniform(x, y, *route.lora)
        A, B, scales, ranks = slots.A, slots.B, slots.scales, slots.ranks
        backend = resolve_backend(x, A, B, route.weights)
        if route.uniform is not None and backend in ("torch", "triton"):
            # one adapter for every row, known on the host: a plain LoRA on its slices of the bank, two GEMMs on any
            # device and in training or inference (the routed kernels' gathers and launches would only add work)
            a = route.uniform
            r = slots.host_ranks[a]
            if A.dtype != x.dtype and cast_cache.may_cache(A, B):  # a frozen bank: cast once, not per call
                A, B = cast_cache.cast(A, x.dtype), cast_cache.cast(B, x.dtype)
            return bank_uniform(x, y, A, B, a, r, slots.host_scales[a])
        if (backend == "torch" and route.one_per_row and x.dim() == 3 and route.ids.shape[0] == x.shape[0]
                and (shared := slots.shared_rank_and_scale()) is not None):
            # one adapter per row, weight 1, every adapter of one rank and scale here: two batched GEMMs
            return multi_lora_per_row(x, y, A, B, route.ids[:, 0], *shared)
        if backend == "torch":
            A, B = slots.tight()  # no rank padding in the torch forms
            if A.shape[2] == 0:
                return y
        if route.seq_ids is not None and x.dim() == 3 and route.ids.shape[0] == x.shape[0]:
            # sentence routing, one sequence per batch row: wide nuclei at prefill take the concatenated form
            return multi_lora_sequences(x, y, A, B, scales, ranks, route.ids, route.weights, route.seq_ids)
        return multi_lora(x, y, A, B, scales, ranks, route.ids, route.weights, route.seq_ids)

    def _packed_gate(self, x, router, gate):
        """A learning gate's projection as one GEMM (``kernels.multi_lora_coef_packed``), where the base layer and
        the bank are frozen and the torch form runs; None otherwise (the three GEMMs apart)."""
        slots = self.slots
        A, B = slots.tight()
        frozen = not (self.base_layer.weight.requires_grad or A.requires_grad or B.requires_grad)
        if not frozen or len(self.ctx.bank) == 0 or resolve_backend(x, A, B) == "reference":
            return None
        return multi_lora_coef_packed(x, self.base_layer, A, B, slots.scales, slots.ranks, gate,
                                      lambda logits: router.route_logits(self.route_state, logits).per_token,
                                      with_base=router.pack_base)

    def extra_repr(self) -> str:
        return f"{self.module_name}, adapters={len(self.ctx.bank)}"
