"""DLP-LoRA: a small sentence-level router picks a nucleus of adapters once per input.

Sentence features (our choice; the paper's 5M "mini-MLP" is unreleased, its code uses ALBERT/RoBERTa): from the
base model's own *input embeddings* (frozen, no second tokenizer, no extra forward pass; one embedding lookup),
the mean over the routed span plus means over windows of the first tokens (``models/router_features.py``: the
windows keep the instruction cues a mean loses; ``span_tokens`` routes on the span the router was trained on).
``prefix_windows=(), span_tokens=None`` is the plain mean over every routed token (routers saved before). On the
features (F = (1 + m) d for m windows) sits a 4-layer MLP

    LayerNorm(F) -> Linear(F, h) -> GELU -> Linear(h, h) -> GELU -> Linear(h, h) -> GELU -> Linear(h, L)

``conf/router/dlp.yaml``: windows ends (4, 8, 16, 32), h = 1024: 5.1M parameters on SmolLM2-135M (d = 576), the
paper's ~5M (the mean alone with h = 1408 was 4.8M). Trained with
cross-entropy on the task id (``classification_loss``). Routing: ``p = softmax(logits)``, top-p nucleus
(p = 0.6, keep at least one; ``max_kept`` caps the nucleus, e.g. 2 to time a trained router's typical 1-3 with a
fresh one), fusion weights = softmax over the kept probabilities (DLP-LoRA's code) or
renormalised (``fusion="renorm"``). One decision per sequence at prefill, reused for every generated token
(the kernel's seq_ids form).

``dlp_segments`` (beyond the paper): a composite prompt is split into segments (blank lines, ``[INST]`` blocks);
each segment's tokens are routed by that segment's own embedding at prefill, generated tokens by the whole
prompt's route.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from models.router_features import (
    check_windows,
    feature_dim,
    segment_positions,
    sequence_features,
    span_features,
)
from models.routing import SequenceRouter, route_top_p


class DLPRouter(SequenceRouter):
    name = "dlp"
    trainable = True

    def __init__(self, ctx, embedding: nn.Embedding, hidden: int = 1408, layers: int = 4, top_p: float = 0.6,
                 fusion: str = "softmax", dropout: float = 0.0, max_kept: int | None = None, prefix_windows=(),
                 span_tokens: int | None = None):
        super().__init__(ctx)
        if not 0 < top_p <= 1:
            raise ValueError(f"dlp top_p={top_p!r} must be in (0, 1] (DLP-LoRA used 0.6)")
        if max_kept is not None and (not isinstance(max_kept, int) or max_kept < 1):
            raise ValueError(f"dlp max_kept={max_kept!r} must be a positive integer or None (no cap on the nucleus)")
        self.max_kept = max_kept
        if fusion not in ("softmax", "renorm"):
            raise ValueError(f"dlp fusion={fusion!r} is not known; use 'softmax' (DLP-LoRA's code) or 'renorm'")
        if not isinstance(layers, int) or layers < 1 or not isinstance(hidden, int) or hidden < 1:
            raise ValueError(f"dlp layers={layers!r} / hidden={hidden!r} must be positive integers")
        if span_tokens is not None and int(span_tokens) < 1:
            raise ValueError(f"dlp span_tokens={span_tokens!r} must be a positive number of tokens or null (all)")
        object.__setattr__(self, "embedding", embedding)  # the base model's, frozen, not saved with the router
        d, L = embedding.embedding_dim, len(ctx.bank)
        self.top_p, self.fusion, self.hidden, self.layers, self.dropout = float(top_p), fusion, hidden, layers, dropout
        self.prefix_windows = check_windows(prefix_windows)
        self.span_tokens = None if span_tokens is None else int(span_tokens)
        width = feature_dim(d, self.prefix_windows)
        mods: list = [nn.LayerNorm(width)]
        for _ in range(layers - 1):
            mods += [nn.Linear(width, hidden), nn.GELU(), nn.Dropout(dropout)]
            width = hidden
        mods.append(nn.Linear(width, L))
        self.mlp = nn.Sequential(*mods).to(embedding.weight.device)

    def config(self):
        return {"hidden": self.hidden, "layers": self.layers, "top_p": self.top_p, "fusion": self.fusion,
                "dropout": self.dropout, "max_kept": self.max_kept, "prefix_windows": list(self.prefix_windows),
                "span_tokens": self.span_tokens}

    def adapter_row_keys(self):
        last = len(self.mlp) - 1
        return [f"mlp.{last}.weight", f"mlp.{last}.bias"]

    # ---- classifier ------------------------------------------------------------------------------------------
    def sentence_embedding(self, input_ids=None, attention_mask=None, inputs_embeds=None) -> torch.Tensor:
        """The router's features of each sequence (tokens with mask 1) -> [B, (1 + windows) d] fp32."""
        with torch.no_grad():
            e = inputs_embeds if inputs_embeds is not None else self.embedding(input_ids)
            return sequence_features(e, attention_mask, self.span_tokens, self.prefix_windows)

    def logits(self, input_ids=None, attention_mask=None, inputs_embeds=None) -> torch.Tensor:
        """Router logits [B, L] for whole sequences."""
        emb = self.sentence_embedding(input_ids, attention_mask, inputs_embeds)
        return self.mlp(emb.to(self.mlp[-1].weight.dtype))

    def classification_loss(self, input_ids, attention_mask, task_ids) -> torch.Tensor:
        """DLP-LoRA's router objective: cross-entropy of the logits against the task id of each sequence."""
        return F.cross_entropy(self.logits(input_ids, attention_mask).float(), task_ids.to(input_ids.device))

    def select(self, logits: torch.Tensor):
        return route_top_p(torch.softmax(logits.float(), dim=-1), self.top_p, self.fusion, self.max_kept)

    # ---- routing ---------------------------------------------------------------------------------------------
    def _mask(self, attention_mask, ref):
        m = self.ctx.route_mask if self.ctx.route_mask is not None else attention_mask
        if m is None:
            m = torch.ones(ref.shape[:2], dtype=torch.long, device=ref.device)
        return m.to(ref.device)

    def decide(self, input_ids, attention_mask, inputs_embeds):
        ref = input_ids if input_ids is not None else inputs_embeds
        return self.select(self.logits(input_ids, self._mask(attention_mask, ref), inputs_embeds))

    @torch.no_grad()
    def on_adapters_changed(self, old_names, new_names):
        last = self.mlp[-1]
        new = nn.Linear(last.in_features, len(new_names), dtype=last.weight.dtype, device=last.weight.device)
        for j, n in enumerate(new_names):
            if n in old_names:
                new.weight[j], new.bias[j] = last.weight[old_names.index(n)], last.bias[old_names.index(n)]
        new.requires_grad_(last.weight.requires_grad)
        self.mlp[-1] = new


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


class DLPSegmentRouter(DLPRouter):
    name = "dlp_segments"

    def decide(self, input_ids, attention_mask, inputs_embeds):
        if input_ids is None or self.ctx.tokenizer is None:
            raise ValueError("router 'dlp_segments' needs input_ids and the tokenizer: build the model with tokenizer=")
        mask = self._mask(attention_mask, input_ids)
        B, S = input_ids.shape
        seg = torch.full((B, S), -1, dtype=torch.long, device=input_ids.device)
        n_seg = 0
        for b in range(B):
            pos = mask[b].nonzero().squeeze(1)
            pieces = [self.ctx.tokenizer.decode([int(t)]) for t in input_ids[b, pos]]
            s = torch.tensor(segment_tokens(pieces), dtype=torch.long, device=input_ids.device)
            _, s = torch.unique(s, return_inverse=True)
            seg[b, pos] = s + n_seg
            n_seg += int(s.max()) + 1 if len(s) else 0
        # one feature vector per segment: the router's features of its tokens (models/router_features.py)
        with torch.no_grad():
            e = self.embedding(input_ids).float().reshape(B * S, -1)
            flat = seg.reshape(-1)
            ok = flat >= 0
            seg_emb = span_features(e, flat, segment_positions(flat), n_seg, self.span_tokens, self.prefix_windows)
        seg_ids, seg_w = self.select(self.mlp(seg_emb.to(self.mlp[-1].weight.dtype)))
        whole_ids, whole_w = whole = self.select(self.logits(input_ids, mask))
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
        self._pending_tok = (tok_ids.reshape(B, S, K), tok_w.reshape(B, S, K))
        return whole

    def begin_forward(self, input_ids, attention_mask, inputs_embeds, is_prefill):
        super().begin_forward(input_ids, attention_mask, inputs_embeds, is_prefill)
        if is_prefill:
            self._tok = self._pending_tok
