"""peft's ``lora_dropout`` for a MultiLoRAModel in training: dropout on the LoRA branch's input only.

peft computes ``base(x) + lora_B(lora_A(dropout(x))) * scaling``: the base projection sees the whole input, only
the adapter's branch a dropped-out one. ``MultiLoRALinear`` passes one ``x`` to both (``y = base(x)``, then the
op adds the routed deltas of ``x``), so this file gets peft's form from outside the layer, with two hooks per
wrapped projection and no change to it: the pre-hook hands the layer ``d = dropout(x)``, the post-hook adds
``W (x - d)`` (no bias), and since the base is linear

    base(d) + delta(d) + W (x - d)  =  W x + b + delta(d)  =  base(x) + delta(dropout(x)).

It costs one extra base-sized matmul per wrapped projection and training step (a ``dropout`` inside the layer
would avoid it); in eval mode, or at p = 0, the hooks do nothing. Dropout draws differ from peft's (other
tensors, another order), so a run with p > 0 matches a separate peft run in distribution, not bit for bit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def add_lora_input_dropout(mm, p: float) -> list:
    """Hook every wrapped projection of ``mm`` (a ``models.MultiLoRAModel``); returns the hook handles (call
    ``.remove()`` on each to undo). p = 0 adds nothing."""
    if not 0.0 <= float(p) < 1.0:
        raise ValueError(f"lora_dropout={p} must be in [0, 1)")
    if float(p) == 0.0:
        return []
    dropped: dict[int, torch.Tensor] = {}

    def before(layer, args):
        if not layer.training:
            return None
        (x,) = args
        d = F.dropout(x, float(p), training=True)
        dropped[id(layer)] = x - d
        return (d,)

    def after(layer, args, out):
        rest = dropped.pop(id(layer), None)
        return out if rest is None else out + F.linear(rest, layer.weight)

    handles = []
    for name in mm.bank.modules_wrapped:
        layer = mm.model.get_submodule(name)
        handles += [layer.register_forward_pre_hook(before), layer.register_forward_hook(after)]
    return handles
