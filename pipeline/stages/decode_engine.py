"""How evaluate's batched greedy generate calls run: ``generation.engine``.

    generate   transformers' ``generate`` (dynamic KV cache, one Python step per token)
    graph      ``models.graph_generate``: static KV cache, the decode step captured once per call as a CUDA graph
               and replayed per token (on the CPU the same loop without capture)
    auto       graph on CUDA where the model supports it (full and sliding-window attention layers), generate
               elsewhere; the first call is run both ways and compared (``agreement``), and a disagreement or a
               capture error falls back to generate for the rest of the run

The check (``agreement``). A row agrees when its first ``CHECK_TOKENS`` new tokens equal generate's, or when they
part at a near-tie: at the first token where they differ (both loops were fed the same tokens until then),
generate's own scores put the graph's token within ``NEAR_TIE_EPS`` machine epsilons of the matmuls
(``compute_eps``; times the top score) of generate's choice. Fewer than ``MIN_AGREEMENT`` of the rows agreeing is a
disagreement.

Why near-ties count. bf16 logits of SmolLM2 are quantised to 1/8 around 20; on composite prompts (free text, every
row runs all ``CHECK_TOKENS``), about 5% of generate's steps have their top two scores within 1/8 and 1% tie
exactly (SmolLM2 under bf16 autocast on the CPU). The static cache's attention reduces over more (masked) keys than
generate's, so its logits differ by a few bf16 steps and such a tie may go either way. On the H200, exact equality
alone passed single-task runs (answers of a few tokens: 197-199 of 199 rows equal) but sent most composite runs to
generate (32 to 38 of 40), which cost composite-10 about five minutes per strategy. A wrong route, position or
mask moves logits by whole units from the first token on, far past the tolerance. The tolerance, 4 epsilons times
the top score, is 4 to 8 bf16 steps at the top score (0.625 at 20): the rows that parted on the CPU did so by 1 to
2 steps, and the two loops' logits of one step differ by up to 0.6 across the vocabulary.

What ran is recorded in the run's metrics.json (``generation_engine``, ``graph_check``: rows, rows equal, rows
parted at a near-tie, tokens compared, and the margin and tolerance of every row that parted; ``graph_phases``: the
graph calls' seconds by phase, prefill / first eager step / capture / replays, the device synchronised at each
boundary, and their replayed steps: replay / replayed_steps is a decode step's time, to set beside the host's).
"""

from __future__ import annotations

import logging

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from models.attention import gqa_decode
from models.graph_generate import graph_generate, supports
from pipeline.runtime.entry import first_line
from pipeline.runtime.settings import GENERATION_ENGINES

log = logging.getLogger(__name__)

MIN_AGREEMENT = 0.9  # auto's first-call check: the share of rows that must agree with generate's
CHECK_TOKENS = 32  # ... over their first this many new tokens
NEAR_TIE_EPS = 4  # a row parting from generate's by a margin within this many epsilons x the top score agrees


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
        self.phases: dict = {}  # the graph calls' phases summed (``graph_generate(phases=...)``) and their count

    def record(self) -> dict:
        """What ran: the engine, the first call's check, and where the graph calls' time went (seconds per phase
        summed over calls, replayed decode steps, calls; None without a graph call)."""
        phases = {k: round(v, 3) if isinstance(v, float) else v for k, v in self.phases.items()} or None
        return {"generation_engine": self.name, "graph_check": self.check, "graph_phases": phases}

    def __call__(self, mm, ids, mask, **kw):
        if self.name == "generate":
            return _generate(mm, ids, mask, **kw)
        try:
            phases: dict = {}
            out = graph_generate(mm, ids, mask, capture=self.cuda, phases=phases, **kw)
            for k, v in phases.items():
                self.phases[k] = self.phases.get(k, 0) + v
            self.phases["calls"] = self.phases.get("calls", 0) + 1
        except (RuntimeError, ValueError, AssertionError) as e:  # a capture the stack cannot do: keep the run going
            error = first_line(e)[:200]
            log.warning("generation.engine: the CUDA graph decode failed (%s); generate for the rest of the run",
                        error)
            self.name, self.check = "generate", {"error": error}
            return _generate(mm, ids, mask, **kw)
        if self.to_check:
            self.to_check = False
            # generate's first CHECK_TOKENS tokens only (eager generate of a routed model is host-bound: a
            # composite-10 call's whole budget took it about a minute); the whole call again on a disagreement
            checked = min(int(kw["max_new_tokens"]), CHECK_TOKENS)
            margins = _Margins(out, ids.shape[1], checked)
            ref = _generate(mm, ids, mask, **{**kw, "max_new_tokens": checked,
                                              "logits_processor": [*(kw.get("logits_processor") or []), margins]})
            self.check = agreement(out, ref, ids.shape[1], margins, compute_eps(mm, ids.device))
            agree = self.check["rows_equal"] + self.check["rows_near_tie"]
            if agree < MIN_AGREEMENT * ids.shape[0]:
                log.warning("generation.engine: the CUDA graph decode agreed with generate on %d of %d rows "
                            "(%d equal, %d parted at a near-tie); generate for the rest of the run", agree,
                            ids.shape[0], self.check["rows_equal"], self.check["rows_near_tie"])
                self.name = "generate"
                return ref if checked == int(kw["max_new_tokens"]) else _generate(mm, ids, mask, **kw)
            log.info("generation.engine: graph decode checked against generate: %d of %d rows equal, %d parted at a "
                     "near-tie", self.check["rows_equal"], ids.shape[0], self.check["rows_near_tie"])
        return out


class _Margins(LogitsProcessor):
    """Placed last in generate's processors for the check: at each of the first ``steps`` new tokens, how far the
    graph's token scores below generate's choice (the top of the scores every other processor has made; inf where a
    processor forbade the graph's token) and that top score. Returns the scores unchanged."""

    def __init__(self, graph_ids: torch.Tensor, prompt_len: int, steps: int):
        self.graph, self.prompt_len, self.steps = graph_ids, int(prompt_len), int(steps)
        self.gaps: list[torch.Tensor] = []
        self.tops: list[torch.Tensor] = []

    def __call__(self, input_ids, scores):
        col = input_ids.shape[1]  # the column this step's token goes to
        if col - self.prompt_len < self.steps and col < self.graph.shape[1]:
            top = scores.max(-1).values
            theirs = scores.gather(1, self.graph[:, col, None].to(scores.device)).squeeze(1)
            self.gaps.append((top - theirs).float().nan_to_num(nan=float("inf")))
            self.tops.append(top.float())
        return scores


def agreement(out: torch.Tensor, ref: torch.Tensor, prompt_len: int, margins: _Margins, eps: float) -> dict:
    """The graph's tokens ``out`` against generate's ``ref`` over the first new tokens both have (module doc):
    rows equal, rows parted at a near-tie, and each parting row's step, margin and tolerance (``eps``: the machine
    epsilon of the matmuls, ``compute_eps``)."""
    n = min(out.shape[1], ref.shape[1], prompt_len + len(margins.gaps))
    differ = (out[:, prompt_len:n] != ref[:, prompt_len:n]).cpu()
    parted = []
    for row in differ.any(dim=1).nonzero().flatten().tolist():
        t = int(differ[row].nonzero()[0])
        gap, top = float(margins.gaps[t][row]), float(margins.tops[t][row])
        tol = NEAR_TIE_EPS * eps * abs(top)
        parted.append({"row": row, "step": t, "margin": float(f"{gap:.4g}"), "tolerance": float(f"{tol:.4g}"),
                       "near_tie": gap <= tol})
    return {"rows": int(out.shape[0]), "rows_equal": int(out.shape[0]) - len(parted),
            "rows_near_tie": sum(p["near_tie"] for p in parted), "tokens_compared": n - prompt_len,
            "parted": parted}


#: the machine epsilon of fp32 matmuls by torch.get_float32_matmul_precision: TF32 (10 mantissa bits) at "high",
#: bf16 at "medium"
FP32_MATMUL_EPS = {"highest": torch.finfo(torch.float32).eps, "high": 2.0**-10,
                   "medium": torch.finfo(torch.bfloat16).eps}


def compute_eps(mm, device: torch.device) -> float:
    """The machine epsilon of the model's matmuls: autocast's dtype where it is on (evaluate's bf16-mixed), else the
    weights' (fp32 as ``torch.set_float32_matmul_precision`` lets it run: TF32 or bf16 below "highest")."""
    if torch.is_autocast_enabled(device.type):
        return float(torch.finfo(torch.get_autocast_dtype(device.type)).eps)
    dtype = next(mm.parameters()).dtype
    if dtype == torch.float32 or not dtype.is_floating_point:
        return float(FP32_MATMUL_EPS.get(torch.get_float32_matmul_precision(), torch.finfo(torch.float32).eps))
    return float(torch.finfo(dtype).eps)


def _generate(mm, ids, mask, *, max_new_tokens, pad_token_id, eos_token_id, task_ids=None, logits_processor=None):
    """transformers' greedy generate, its decode steps attending as the graph decode's do (``gqa_decode``)."""
    kw = {"task_ids": task_ids} if task_ids is not None else {}
    if logits_processor:
        kw["logits_processor"] = LogitsProcessorList(logits_processor)
    with gqa_decode(mm):
        return mm.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                           pad_token_id=pad_token_id, eos_token_id=eos_token_id, **kw)
