"""DLP-LoRA: a small sentence-level router picks a nucleus of adapters once per input.

Sentence features (our choice; the paper's 5M "mini-MLP" is unreleased, its code uses ALBERT/RoBERTa): from the
base model's own *input embeddings* (frozen, no second tokenizer, no extra forward pass; one embedding lookup),
the mean over the routed span plus means over windows of the first tokens (``models/routing/features.py``: the
windows keep the instruction cues a mean loses; ``span_tokens`` routes on the span the router was trained on).
``prefix_windows=(), span_tokens=None`` is the plain mean over every routed token (routers saved before these
features load so: ``saved_before``). On the features (F = (1 + m) d for m windows) sits a 4-layer MLP

    LayerNorm(F) -> Linear(F, h) -> GELU -> Linear(h, h) -> GELU -> Linear(h, h) -> GELU -> Linear(h, L)

Defaults: windows ends (4, 8, 16, 32), h = 1024: 5.1M parameters on SmolLM2-135M (d = 576), the paper's ~5M (the
mean alone with h = 1408 was 4.8M). Trained with cross-entropy on the task id (``classification_loss``). Routing:
``p = softmax(logits)``, top-p nucleus (p = 0.6, keep at least one; ``max_kept`` caps the nucleus, e.g. 2 to time a
trained router's typical 1-3 with a fresh one), fusion weights = softmax over the kept probabilities (DLP-LoRA's
code) or renormalised (``fusion="renorm"``). One decision per sequence at prefill, reused for every generated token
(the kernel's seq_ids form).

Training (``training_loss``, the route stage): cross-entropy of the classifier's logits against each prompt's task
id, no LM forward; its routing accuracy is the task identification of the prompt (the paper reports 98.45%).

With a ``segmenter`` (``dlp_segments``, beyond the paper) the same classifier also routes each segment of a prompt
at prefill (``models/routing/dlp_segments.py``); it holds no weights of its own, so one trained router serves both.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from models.routing.features import check_windows, feature_dim, sequence_features
from models.routing.registry import strategy
from models.routing.route import SequenceRouter, route_top_p

WINDOWS = (4, 8, 16, 32)  # prefix-window ends of the features (models/routing/features.py)


def _positive_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 1


@strategy("dlp")
class DLPRouter(SequenceRouter):
    keeps_decode_graph = True
    trainable = True
    #: what a router.json saved before a knob existed stands for (load_router reads it under the saved config)
    saved_before: ClassVar[dict] = {"prefix_windows": (), "span_tokens": None}

    @staticmethod
    def check(adapters: list, hidden: int = 1024, layers: int = 4, top_p: float = 0.6, fusion: str = "softmax",
              dropout: float = 0.0, max_kept: int | None = None, prefix_windows=WINDOWS,
              span_tokens: int | None = None) -> None:
        """Refuse knobs the router cannot be built with (one ValueError line); the stages call it before a model loads."""
        if not isinstance(top_p, (int, float)) or isinstance(top_p, bool) or not 0 < top_p <= 1:
            raise ValueError(f"dlp top_p={top_p!r} must be in (0, 1] (DLP-LoRA used 0.6)")
        if max_kept is not None and not _positive_int(max_kept):
            raise ValueError(f"dlp max_kept={max_kept!r} must be a positive integer or None (no cap on the nucleus)")
        if fusion not in ("softmax", "renorm"):
            raise ValueError(f"dlp fusion={fusion!r} is not known; use 'softmax' (DLP-LoRA's code) or 'renorm'")
        if not _positive_int(layers) or not _positive_int(hidden):
            raise ValueError(f"dlp layers={layers!r} / hidden={hidden!r} must be positive integers")
        if not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
            raise ValueError(f"dlp dropout={dropout!r} must be in [0, 1)")
        if span_tokens is not None and not _positive_int(span_tokens):
            raise ValueError(f"dlp span_tokens={span_tokens!r} must be a positive number of tokens or null (all)")
        check_windows(prefix_windows)

    def __init__(self, ctx, embedding: nn.Embedding | None = None, hidden: int = 1024, layers: int = 4,
                 top_p: float = 0.6, fusion: str = "softmax", dropout: float = 0.0, max_kept: int | None = None,
                 prefix_windows=WINDOWS, span_tokens: int | None = None, segmenter=None):
        super().__init__(ctx)
        self.check(ctx.bank, hidden, layers, top_p, fusion, dropout, max_kept, prefix_windows, span_tokens)
        self.max_kept = max_kept
        embedding = ctx.embedding if embedding is None else embedding
        object.__setattr__(self, "embedding", embedding)  # the base model's, frozen, not saved with the router
        object.__setattr__(self, "segmenter", segmenter)  # routes each segment too (dlp_segments); holds no weights
        self.name = "dlp_segments" if segmenter is not None else "dlp"
        self._pending_tok = None  # the segment routes of the prefill being decided
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

    @property
    def label(self) -> str:
        return "dlp-segments" if self.segmenter is not None else "dlp"

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

    def training_loss(self, mm, batch) -> tuple[torch.Tensor, dict]:
        """The classifier's cross-entropy on a batch of prompts (``input_ids / attention_mask / task_ids``) and its
        task-identification accuracy: ``(loss, {router_accuracy})``. No LM forward (``mm`` is not run)."""
        logits = self.logits(batch["input_ids"], batch["attention_mask"]).float()
        task_ids = batch["task_ids"].to(logits.device)
        return F.cross_entropy(logits, task_ids), {"router_accuracy": (logits.argmax(-1) == task_ids).float().mean()}

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
        mask = self._mask(attention_mask, ref)
        whole = self.select(self.logits(input_ids, mask, inputs_embeds))
        if self.segmenter is not None:  # each segment's tokens take their segment's route at prefill
            self._pending_tok = self.segmenter.token_routes(self, input_ids, mask, whole)
        return whole

    def begin_forward(self, input_ids, attention_mask, inputs_embeds, is_prefill):
        super().begin_forward(input_ids, attention_mask, inputs_embeds, is_prefill)
        if is_prefill and self.segmenter is not None:
            self._tok = self._pending_tok

    @torch.no_grad()
    def on_adapters_changed(self, old_names, new_names):
        last = self.mlp[-1]
        new = nn.Linear(last.in_features, len(new_names), dtype=last.weight.dtype, device=last.weight.device)
        for j, n in enumerate(new_names):
            if n in old_names:
                new.weight[j], new.bias[j] = last.weight[old_names.index(n)], last.bias[old_names.index(n)]
        new.requires_grad_(last.weight.requires_grad)
        self.mlp[-1] = new
