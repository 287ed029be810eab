"""What the torch forms of the op derive from a projection's ``scales`` / ``ranks`` and from a route, in one place.

    rank_mask(ranks, R)          [L, R] bool: column j of adapter a is used (j < r_a)
    scale_table(scales, ranks, R) [L, R] s_a where j < r_a, else 0: scale and rank padding in one gather
    slot_coefficients(...)       per routing slot: ``keep`` [.., K, R] (valid slot and column in rank) and
                                 ``coef`` [.., K, R] = w * s_a on kept columns (fp32, or fp64 for fp64 weights)

A projection's scales and ranks only change with the bank, so when no gradient flows into them the tables are
derived once per (tensor, version) and reused (``kernels.derived_cache``); under torch.compile they are computed in
the graph (the cache is host state, invisible to a compiled graph). The masks are applied with ``torch.where``
(select, never multiply by zero), so what the bank stores past an adapter's rank, or in an empty slot's stand-in
adapter, never reaches the output or the gradients.
"""

from __future__ import annotations

import torch

from kernels.derived_cache import derived


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def rank_mask(ranks: torch.Tensor, R: int) -> torch.Tensor:
    """[L, R] bool: j < r_a."""
    return torch.arange(R, device=ranks.device) < ranks[:, None]


def _tables(scales: torch.Tensor, ranks: torch.Tensor, R: int, acc: torch.dtype):
    keep = rank_mask(ranks.to(scales.device), R)
    return keep, torch.where(keep, scales.to(acc)[:, None], 0.0)


def tables(scales: torch.Tensor, ranks: torch.Tensor, R: int, acc: torch.dtype):
    """``(rank_mask [L, R] bool, scale_table [L, R] acc)``, cached per bank version unless scales need a gradient
    or a graph is being compiled."""
    if torch.compiler.is_compiling() or (torch.is_grad_enabled() and scales.requires_grad):
        return _tables(scales, ranks, R, acc)
    return derived(("scale_rank_tables", acc, R), (scales, ranks), lambda: _tables(scales, ranks, R, acc))


def slot_coefficients(ids: torch.Tensor, weights: torch.Tensor, scales: torch.Tensor, ranks: torch.Tensor, R: int):
    """For routing slots ``ids``/``weights`` [..., K]: ``(a, keep, coef)`` with ``a`` the adapter of each slot (an
    empty slot, id -1, stands in as adapter 0), ``keep`` [..., K, R] bool (slot used and column within the adapter's
    rank) and ``coef`` [..., K, R] = w * s_a where kept (0 elsewhere)."""
    acc = _acc(weights.dtype)
    mask, table = tables(scales, ranks, R, acc)
    valid = ids >= 0
    a = ids.clamp(min=0)
    keep = mask[a] & valid[..., None]
    coef = torch.where(keep, table[a] * weights.to(acc)[..., None], 0.0)
    return a, keep, coef
