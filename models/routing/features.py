"""What the DLP router sees of a prompt: the mean of its tokens' input embeddings, plus means over its first tokens.

DLP-LoRA routes a sentence once, from a small classifier over its text. A mean of the (frozen) input embeddings
over the whole prompt keeps which tokens occur but not where: tasks whose prompts share their vocabulary but not
their instruction ("a passage and a question": contextual_parametric_knowledge_conflicts' "What is the answer to
the question, assuming the context is true ... Question: ..." vs disfl_qa's "Question: ... context: ...") blur
together, because a long passage drowns the instruction's few tokens. So a routed unit (a sequence, or one segment
of it for ``dlp_segments``) is described by a positional pooling:

    [ mean over its first `span` tokens | mean over tokens [0, w1) | [w1, w2) | ... | [w_{m-1}, w_m) ]

* ``span``: the text span routed, the same at training and inference: the router trains on the first
  ``router.train.max_length`` tokens of a prompt, so it routes on those too (a longer prompt routes on its head,
  never on text it was not trained on). None: every routed token.
* ``windows`` (``prefix_windows``, e.g. ``(4, 8, 16, 32)``): window ends; the means of the first tokens in these
  windows keep the prefix cues (the instruction), in coarse order, at the cost of one d-sized block each (a
  window past a short unit's end is zeros). ``()`` is the plain mean (routers saved before these features).

On real BIG-bench prompts and SmolLM2's embeddings, the mean alone sends a sixth of contextual_parametric_knowledge_
conflicts' test prompts to disfl_qa after a short training, the pooled features none (tests/test_router_features.py).

Units are given per token (``unit`` id, -1 = not routed, and ``pos`` = the token's position inside its unit), so
sequences (one unit per row, left or right padded) and segments share one computation (``index_add``).
Dimensions: ``(1 + len(windows)) * d``.
"""

from __future__ import annotations

import torch


def feature_dim(d: int, windows=()) -> int:
    return (1 + len(tuple(windows))) * int(d)


def check_windows(windows) -> tuple[int, ...]:
    ends = tuple(int(w) for w in windows)
    if any(w <= 0 for w in ends) or list(ends) != sorted(set(ends)):
        raise ValueError(f"prefix_windows={list(windows)} must be increasing positive token counts, "
                         f"e.g. [4, 8, 16, 32]")
    return ends


def _means(e: torch.Tensor, unit: torch.Tensor, keep: torch.Tensor, n_units: int) -> torch.Tensor:
    u = unit[keep]
    sums = torch.zeros(n_units, e.shape[-1], device=e.device).index_add_(0, u, e[keep])
    count = torch.zeros(n_units, device=e.device).index_add_(0, u, torch.ones_like(u, dtype=e.dtype))
    return sums / count.clamp(min=1.0)[:, None]


def span_features(embeds: torch.Tensor, unit: torch.Tensor, pos: torch.Tensor, n_units: int,
                  span: int | None = None, windows=()) -> torch.Tensor:
    """``[n_units, (1 + m) d]`` fp32 features from token embeddings ``[T, d]``, each token's ``unit`` (-1: none)
    and ``pos`` (its position in the unit)."""
    e = embeds.float()
    routed = unit >= 0
    parts = [_means(e, unit, routed if span is None else routed & (pos < int(span)), n_units)]
    start = 0
    for end in check_windows(windows):
        parts.append(_means(e, unit, routed & (pos >= start) & (pos < end), n_units))
        start = end
    return torch.cat(parts, dim=-1)


def sequence_features(embeds: torch.Tensor, mask: torch.Tensor | None, span: int | None = None,
                      windows=()) -> torch.Tensor:
    """``[B, (1 + m) d]``: one unit per row of ``embeds`` ``[B, S, d]``, its tokens those with ``mask`` 1 (left or
    right padding alike: a token's position counts the row's earlier masked tokens)."""
    B, S, d = embeds.shape
    m = torch.ones(B, S, dtype=torch.long, device=embeds.device) if mask is None else mask.to(embeds.device).long()
    pos = (m.cumsum(1) - 1).reshape(-1)
    unit = torch.where(m.bool(), torch.arange(B, device=embeds.device)[:, None], -1).reshape(-1)
    return span_features(embeds.reshape(B * S, d), unit, pos, B, span, windows)


def segment_positions(seg: torch.Tensor) -> torch.Tensor:
    """Each token's position inside its segment, for flat segment ids ``[T]`` (-1: none) whose segments are runs
    of consecutive tokens."""
    T = seg.shape[0]
    idx = torch.arange(T, device=seg.device)
    ok = seg >= 0
    n = int(seg.max()) + 1 if bool(ok.any()) else 0
    start = torch.full((max(n, 1),), T, device=seg.device, dtype=torch.long)
    start = start.scatter_reduce(0, seg[ok], idx[ok], reduce="amin")
    return torch.where(ok, idx - start[seg.clamp(min=0)], torch.zeros_like(idx))


__all__ = ["check_windows", "feature_dim", "segment_positions", "sequence_features", "span_features"]
