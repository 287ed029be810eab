"""Small tensors derived from longer-lived ones, computed once per (source tensors, their versions) and reused.

At decode a model calls the op once per wrapped projection per token (210 calls for SmolLM2 with 7 targets), and on
the CPU every torch op costs a few microseconds of dispatch whatever its size. Two things repeat across those calls:
the route (one ``ids``/``weights`` object per forward, shared by every projection) and each projection's
``scales``/``ranks`` (fixed until the bank changes). ``derived(name, sources, fn)`` returns ``fn()`` computed the
first time and cached under (name, the sources' identities); the entry is stale, and recomputed, when any source
is a different object or its version counter, storage address or device changed (an in-place update, a hot swap).
Entries hold their sources weakly and leave with the first of them to be freed. Inference only: a value that
autograd must differentiate must not come from here (callers check ``requires_grad``).
"""

from __future__ import annotations

import weakref

import torch

_CACHE: dict = {}  # (name, ids of sources) -> (weakrefs, stamps, value)


def _drop(key) -> None:
    _CACHE.pop(key, None)


def _stamp(t: torch.Tensor):
    return (t._version, t.data_ptr(), t.device)


def _fresh(hit, sources: tuple, stamps: tuple) -> bool:
    return hit is not None and hit[1] == stamps and all(r is None and t is None or r is not None and r() is t
                                                        for r, t in zip(hit[0], sources))


def peek(name, sources: tuple, default=None):
    """The value ``derived(name, sources, ...)`` holds while it is fresh, else ``default``; never computes (for a
    caller that may not run ``fn`` now, e.g. during a CUDA graph capture, where ``fn`` would read the device)."""
    hit = _CACHE.get((name, *(id(t) for t in sources)))
    stamps = tuple(None if t is None else _stamp(t) for t in sources)
    return hit[2] if _fresh(hit, sources, stamps) else default


def derived(name, sources: tuple, fn):
    """``fn()``, cached until one of ``sources`` (tensors, or None) changes or is freed."""
    key = (name, *(id(t) for t in sources))
    hit = _CACHE.get(key)
    stamps = tuple(None if t is None else _stamp(t) for t in sources)
    if _fresh(hit, sources, stamps):
        return hit[2]
    value = fn()
    refs = tuple(None if t is None else weakref.ref(t) for t in sources)
    if hit is None:
        for t in sources:
            if t is not None:
                weakref.finalize(t, _drop, key)
    _CACHE[key] = (refs, stamps, value)
    return value


def kept_when_frozen(name, sources: tuple, fn, *, trains: bool, otherwise):
    """``derived(name, sources, fn)`` where keeping a value is sound, else ``otherwise()``: under torch.compile or
    while autograd differentiates a source (``trains``) nothing is kept; during a CUDA graph capture only a value
    kept before it is used (``fn`` there would read the device or allocate in the graph's pool)."""
    if torch.compiler.is_compiling() or (trains and torch.is_grad_enabled()):
        return otherwise()
    if sources[0].is_cuda and torch.cuda.is_current_stream_capturing():
        hit = peek(name, sources, _MISS)
        return otherwise() if hit is _MISS else hit
    return derived(name, sources, fn)


_MISS = object()


def clear() -> None:
    _CACHE.clear()
