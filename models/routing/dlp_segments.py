"""``dlp_segments`` (beyond the paper): DLP-LoRA's sentence router applied per segment of a prompt.

A composite prompt asks several questions at once; one nucleus for all of it mixes their adapters. Composed, not
inherited: the strategy is the ``dlp`` classifier (``DLPRouter``, the same weights: a trained dlp router loads as
dlp_segments and back) plus a ``Segmenter`` that splits each prompt at blank lines and at every ``[INST]``. At
prefill each segment's tokens take the route of that segment's own features (the dlp router's, of its tokens alone);
padding, tokens outside ``route_mask`` and every generated token take the whole prompt's route.

    mm.set_router("dlp_segments", top_p=0.6)          # or load a dlp checkpoint: mm.load_router(dir, "dlp_segments")
"""

from __future__ import annotations

import re

import torch

from models.routing.dlp import DLPRouter
from models.routing.features import segment_positions, span_features
from models.routing.registry import strategy

SEGMENT_BOUNDARY = re.compile(r"\n[ \t]*\n\s*|(?=\[INST\])")


def segment_tokens(pieces: list[str]) -> list[int]:
    """Segment index of every token, given each token's decoded text: a new segment starts after a blank line
    and at every ``[INST]``. A token that straddles a boundary belongs to the new segment."""
    text = "".join(pieces)
    bounds = sorted({m.end() if m.group(0) else m.start() for m in SEGMENT_BOUNDARY.finditer(text)} - {0})
    seg, out, end, j = 0, [], 0, 0
    for piece in pieces:
        end += len(piece)
        while j < len(bounds) and bounds[j] < end:
            seg, j = seg + 1, j + 1
        out.append(seg)
    return out


class Segmenter:
    """Per-token routes of a prefill from a sentence classifier applied to each segment (holds no weights)."""

    def token_routes(self, router: DLPRouter, input_ids, mask, whole):
        """``(ids [B, S, K], weights [B, S, K])``: each routed token gets its segment's nucleus, the others
        ``whole`` (the sequence's route, ``(ids [B, Kw], weights [B, Kw])``)."""
        tokenizer = router.ctx.tokenizer
        if input_ids is None or tokenizer is None:
            raise ValueError("router 'dlp_segments' needs input_ids and the tokenizer: build the model with tokenizer=")
        B, S = input_ids.shape
        seg = torch.full((B, S), -1, dtype=torch.long, device=input_ids.device)
        n_seg = 0
        for b in range(B):
            pos = mask[b].nonzero().squeeze(1)
            pieces = [tokenizer.decode([int(t)]) for t in input_ids[b, pos]]
            s = torch.tensor(segment_tokens(pieces), dtype=torch.long, device=input_ids.device)
            _, s = torch.unique(s, return_inverse=True)
            seg[b, pos] = s + n_seg
            n_seg += int(s.max()) + 1 if len(s) else 0
        # one feature vector per segment: the router's features of its tokens (models/routing/features.py)
        with torch.no_grad():
            e = router.embedding(input_ids).float().reshape(B * S, -1)
            flat = seg.reshape(-1)
            ok = flat >= 0
            seg_emb = span_features(e, flat, segment_positions(flat), n_seg, router.span_tokens, router.prefix_windows)
        seg_ids, seg_w = router.select(router.mlp(seg_emb.to(router.mlp[-1].weight.dtype)))
        whole_ids, whole_w = whole
        ks, kw = seg_ids.shape[1], whole_ids.shape[1]
        K = max(ks, kw)
        # every token starts with its sequence's whole route (what padding, and the answer tokens of a
        # teacher-forced forward outside route_mask, use); tokens of a segment then take their segment's route
        row = torch.arange(B, device=input_ids.device).repeat_interleave(S)
        tok_ids = torch.full((B * S, K), -1, dtype=torch.long, device=input_ids.device)
        tok_w = torch.zeros(B * S, K, dtype=seg_w.dtype, device=input_ids.device)
        tok_ids[:, :kw], tok_w[:, :kw] = whole_ids[row], whole_w[row]
        tok_ids[ok], tok_w[ok] = -1, 0.0
        tok_ids[ok, :ks], tok_w[ok, :ks] = seg_ids[flat[ok]], seg_w[flat[ok]]
        return tok_ids.reshape(B, S, K), tok_w.reshape(B, S, K)


@strategy("dlp_segments", builds=DLPRouter)
def dlp_segments(ctx, **knobs) -> DLPRouter:
    """The dlp router (its knobs: hidden, layers, top_p, fusion, dropout) routing every segment of a prompt."""
    return DLPRouter(ctx, segmenter=Segmenter(), **knobs)


dlp_segments.check = DLPRouter.check  # the same knobs, the same rules
