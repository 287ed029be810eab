"""How evaluate's batched greedy generate calls run: ``generation.engine``.

    generate   transformers' ``generate`` (dynamic KV cache, one Python step per token)
    graph      ``models.graph_generate``: static KV cache, the decode step captured once per call as a CUDA graph
               and replayed per token (on the CPU the same loop without capture)
    auto       graph on CUDA where the model supports it (full and sliding-window attention layers), generate
               elsewhere; the first call is run both ways and compared, and a disagreement (fewer than
               ``MIN_AGREEMENT`` of the rows with the same first ``CHECK_TOKENS`` new tokens: bf16 near-ties can
               flip a greedy choice, a wrong route or position flips most rows) or a capture error falls back to
               generate for the rest of the run

What ran is recorded in the run's metrics.json (``generation_engine``, ``graph_check``).
"""

from __future__ import annotations

import logging

from models.graph_generate import graph_generate, supports
from pipeline.runtime.entry import first_line
from pipeline.runtime.settings import GENERATION_ENGINES

log = logging.getLogger(__name__)

MIN_AGREEMENT = 0.9  # auto's first-call check: the share of rows whose tokens must equal generate's
CHECK_TOKENS = 32  # ... over their first this many new tokens


class DecodeEngine:
    """Call it as ``engine(mm, ids, mask, max_new_tokens=..., pad_token_id=..., eos_token_id=..., task_ids=...,
    logits_processor=...)``: the generated ``[B, P + n]`` ids, as ``generate`` returns them."""

    def __init__(self, choice: str, mm):
        if choice not in GENERATION_ENGINES:
            raise ValueError(f"generation.engine={choice!r} is not known; use {', '.join(GENERATION_ENGINES)}")
        self.cuda = next(mm.parameters()).is_cuda
        wanted = choice == "graph" or (choice == "auto" and self.cuda)
        self.name = "graph" if wanted and supports(mm) else "generate"
        self.to_check = choice == "auto" and self.name == "graph"
        self.check: dict | None = None

    def record(self) -> dict:
        return {"generation_engine": self.name, "graph_check": self.check}

    def __call__(self, mm, ids, mask, **kw):
        if self.name == "generate":
            return _generate(mm, ids, mask, **kw)
        try:
            out = graph_generate(mm, ids, mask, capture=self.cuda, **kw)
        except (RuntimeError, ValueError, AssertionError) as e:  # a capture the stack cannot do: keep the run going
            error = first_line(e)[:200]
            log.warning("generation.engine: the CUDA graph decode failed (%s); generate for the rest of the run",
                        error)
            self.name, self.check = "generate", {"error": error}
            return _generate(mm, ids, mask, **kw)
        if self.to_check:
            self.to_check = False
            ref = _generate(mm, ids, mask, **kw)
            # the first CHECK_TOKENS new tokens: a long bf16 answer may part ways after a near-tie, a wrong position
            # or route parts them at once
            n = min(out.shape[1], ref.shape[1], ids.shape[1] + CHECK_TOKENS)
            same = int((out[:, :n] == ref[:, :n]).all(dim=1).sum())
            self.check = {"rows": int(ids.shape[0]), "rows_equal": same, "tokens_compared": n - int(ids.shape[1])}
            if same < MIN_AGREEMENT * ids.shape[0]:
                log.warning("generation.engine: the CUDA graph decode agreed with generate on %d of %d rows; "
                            "generate for the rest of the run", same, ids.shape[0])
                self.name = "generate"
                return ref
            log.info("generation.engine: graph decode checked against generate: %d of %d rows equal", same,
                     ids.shape[0])
        return out


def _generate(mm, ids, mask, *, max_new_tokens, pad_token_id, eos_token_id, task_ids=None, logits_processor=None):
    kw = {"task_ids": task_ids} if task_ids is not None else {}
    if logits_processor:
        kw["logits_processor"] = logits_processor
    return mm.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                       pad_token_id=pad_token_id, eos_token_id=eos_token_id, **kw)
