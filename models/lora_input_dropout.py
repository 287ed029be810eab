"""peft's ``lora_dropout`` for a MultiLoRAModel in training: dropout on the LoRA branch's input only.

peft computes ``base(x) + lora_B(lora_A(dropout(x))) * scaling``: the base projection sees the whole input, only
the adapter's branch a dropped-out one. ``MultiLoRALinear`` passes one ``x`` to both (``y = base(x)``, then the
op adds the routed deltas of ``x``), so this file gets peft's form from outside the layer, without changing it:
``LoRAInputDropout`` wraps a wrapped projection, hands it ``d = dropout(x)`` and adds ``W (x - d)`` (no bias);
since the base is linear

    base(d) + delta(d) + W (x - d)  =  W x + b + delta(d)  =  base(x) + delta(dropout(x)).

Stateless (no hook state to carry between calls), so a compiled decoder layer (``models.compile``) traces it like
any module. It costs one extra base-sized matmul per wrapped projection and training step (a ``dropout`` inside
the layer would avoid it); in eval mode, or at p = 0, it is the wrapped layer. Dropout draws differ from peft's
(other tensors, another order), so a run with p > 0 matches a separate peft run in distribution, not bit for bit.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn


class LoRAInputDropout(nn.Module):
    """``inner`` (a MultiLoRALinear) with dropout ``p`` on its LoRA branch's input while training."""

    def __init__(self, inner: nn.Module, p: float):
        super().__init__()
        self.inner, self.p = inner, float(p)

    @property
    def base_layer(self) -> nn.Module:  # what MultiLoRAModel.unwrap puts back
        return self.inner.base_layer

    @property
    def weight(self):
        return self.inner.weight

    def forward(self, x):
        if not self.training or self.p == 0.0:
            return self.inner(x)
        d = F.dropout(x, self.p, training=True)
        return self.inner(d) + F.linear(x - d, self.inner.weight)


def add_lora_input_dropout(mm, p: float) -> list[str]:
    """Wrap every wrapped projection of ``mm`` (a ``models.MultiLoRAModel``) in ``LoRAInputDropout(p)``; returns
    their names. p = 0 wraps nothing. ``mm.unwrap()`` still restores the plain model."""
    if not 0.0 <= float(p) < 1.0:
        raise ValueError(f"lora_dropout={p} must be in [0, 1)")
    if float(p) == 0.0:
        return []
    for name in mm.bank.modules_wrapped:
        parent, _, child = name.rpartition(".")
        owner = mm.model.get_submodule(parent) if parent else mm.model
        setattr(owner, child, LoRAInputDropout(getattr(owner, child), p))
    return list(mm.bank.modules_wrapped)
