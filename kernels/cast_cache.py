"""Casts of long-lived tensors (an adapter bank's A and B) to the compute dtype, made once and then reused.

A bank stored in fp32 that serves bf16 activations (autocast, or a model cast after it was wrapped) would otherwise
copy every projection's A and B on every call: 2 x 210 copies per decoded token of SmolLM2. ``cast(t, dtype)``
returns ``t`` itself when it already has ``dtype``; otherwise one cached copy (``kernels.derived_cache``), keyed on
the tensor's identity and its version counter, so an in-place update (an optimizer step, ``copy_``) or a hot swap
(new tensors) invalidates it. Entries hold the source only weakly and leave with it. Only for the inference path: a cast that autograd must
differentiate stays in the graph (``kernels.op`` calls this only when no gradient is needed).
Writes through ``t.data`` (``module.to(device)`` swaps a parameter's storage that way) do not bump ``t._version``;
the storage's address is checked too, so a swapped storage is a miss. An in-place ``t.data.copy_(...)`` is still
invisible: replace the tensor or write to ``t`` itself.
"""

from __future__ import annotations

import torch

from kernels import derived_cache


def may_cache(*tensors: torch.Tensor) -> bool:
    """May a call over ``tensors`` read cached casts? Only where nothing must trace or differentiate them: not under
    torch.compile (it must see the cast), not during a CUDA graph capture (a cached copy made there would live in
    the graph's pool, a copy made before it would be read from outside), and when none of ``tensors`` needs a
    gradient (a cached cast is detached). The one rule for every caller: the op's direct launch, the uniform path."""
    if torch.compiler.is_compiling():
        return False
    if any(t.is_cuda for t in tensors) and torch.cuda.is_current_stream_capturing():
        return False
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))


def cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` in ``dtype``: ``t`` itself, a cached copy, or (first time / after a change) a new cached copy."""
    if t.dtype == dtype:
        return t
    return derived_cache.derived(("cast", dtype), (t,), lambda: t.detach().to(dtype))


def clear() -> None:
    """Forget every cached cast (and every other derived value: they are recomputed on their next use)."""
    derived_cache.clear()
