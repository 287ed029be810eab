"""Batched greedy generation through a ``MultiLoRAModel``: left padding, KV cache, one route per batch, any number
of processes.

Prompts are sorted by length so each batch pads little and cut into *jobs* (one ``generate`` call each); prompts
longer than ``max_prompt_tokens`` are skipped and counted (MeteoRA skips prompts over 4096 tokens), their
prediction None. Each prompt is encoded exactly as training encoded it (``encode_prompt``).

    groups = [PromptGroup(prompts, task_ids=None, max_new_tokens=16)]       # e.g. one group per task
    gens = generate_groups(trainer, mm, tokenizer, groups, batch_size=8)     # rank 0: [Generations]; others: None

``generate_groups`` runs the jobs through ``Trainer.predict``: with one device that is a plain loop; under DDP
Lightning's ``UnrepeatedDistributedSamplerWrapper`` hands rank r the jobs r, r+N, ... (none twice, none lost),
each rank generates its share, and the outputs are gathered once, on rank 0, back into input order. The jobs
are the same whatever the number of processes, so predictions equal a one-process run's exactly.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import lightning as L
import torch


@dataclass
class PromptGroup:
    """Prompts generated with the same settings (one task, or the composite prompts)."""

    prompts: list
    task_ids: list | None = None  # one adapter name per prompt (the oracle), else None
    max_new_tokens: int = 16
    min_answers: int | None = None  # composite-n: EOS held back until n numbered answers (pipeline.eos_gate)


@dataclass
class Generations:
    """Outputs in input order (None = skipped), sentence routes where the router made one, and timing."""

    texts: list
    routes: list = field(default_factory=list)
    skipped: int = 0
    seconds: float = 0.0
    new_tokens: int = 0
    max_new_tokens: int = 0


def left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ``input_ids`` and ``attention_mask`` (the last column is every row's last real token)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[i, width - len(s):] = 1
    return ids, mask


def plan_jobs(tokenizer, groups: list[PromptGroup], batch_size: int, max_prompt_tokens: int):
    """``(jobs, skipped per group)``: each job is one generate call, ``{"group", "indices", "input_ids", ...}``."""
    from pipeline.answer_batches import encode_prompt

    jobs, skipped = [], []
    for g, group in enumerate(groups):
        enc = [encode_prompt(tokenizer, p) for p in group.prompts]
        keep = [i for i, e in enumerate(enc) if 0 < len(e) <= max_prompt_tokens]
        order = sorted(keep, key=lambda i: len(enc[i]))
        skipped.append(len(enc) - len(keep))
        for s in range(0, len(order), batch_size):
            batch = order[s:s + batch_size]
            jobs.append({"group": g, "indices": batch, "input_ids": [enc[i] for i in batch],
                         "task_ids": [group.task_ids[i] for i in batch] if group.task_ids is not None else None,
                         "max_new_tokens": int(group.max_new_tokens), "min_answers": group.min_answers})
    return jobs, skipped


@torch.no_grad()
def run_job(mm, tokenizer, job: dict) -> dict:
    """One batched greedy ``generate``: ``{"group", "indices", "texts", "routes", "new_tokens"}``."""
    t0 = time.perf_counter()
    device = next(mm.parameters()).device
    ids, mask = left_pad(job["input_ids"], tokenizer.pad_token_id)
    kw = {"task_ids": job["task_ids"]} if job["task_ids"] is not None else {}
    if job.get("min_answers"):
        from transformers import LogitsProcessorList

        from pipeline.eos_gate import EOSUntilAnswers

        kw["logits_processor"] = LogitsProcessorList([EOSUntilAnswers(tokenizer, ids.shape[1], job["min_answers"])])
    gen = mm.generate(ids.to(device), attention_mask=mask.to(device), max_new_tokens=job["max_new_tokens"],
                      do_sample=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, **kw)
    new = gen[:, ids.shape[1]:].cpu()
    route = mm.last_route()
    routes = [None] * len(job["indices"])
    if route is not None:
        rid, rw = route
        routes = [{"ids": rid[row].tolist(), "weights": [round(float(w), 4) for w in rw[row]]}
                  for row in range(len(job["indices"]))]
    return {"group": job["group"], "indices": list(job["indices"]), "routes": routes,
            "texts": [tokenizer.decode(t, skip_special_tokens=True).strip() for t in new],
            "new_tokens": int((new != tokenizer.pad_token_id).sum()), "seconds": time.perf_counter() - t0}


class GenerationModule(L.LightningModule):
    """``Trainer.predict`` adapter: each predict batch is one job (``plan_jobs``), its output ``run_job``'s."""

    def __init__(self, mm, tokenizer):
        super().__init__()
        self.mm = mm
        self.tokenizer = tokenizer

    def predict_step(self, job, batch_idx):
        return run_job(self.mm, self.tokenizer, job)


def _one_job(items):
    return items[0]


def assemble(groups: list[PromptGroup], skipped: list[int], outputs: list[dict], seconds: float) -> list[Generations]:
    """Job outputs (any order, from any rank) -> one ``Generations`` per group, in input order; ``seconds`` is the
    generation time of the whole set (each group's share of it is in ``new_tokens``)."""
    gens = [Generations(texts=[None] * len(g.prompts), routes=[None] * len(g.prompts), skipped=s,
                        max_new_tokens=int(g.max_new_tokens)) for g, s in zip(groups, skipped)]
    for out in outputs:
        g = gens[out["group"]]
        for i, text, route in zip(out["indices"], out["texts"], out["routes"]):
            if g.texts[i] is not None:
                raise RuntimeError(f"prompt {i} of group {out['group']} was generated twice")
            g.texts[i], g.routes[i] = text, route
        g.new_tokens += out["new_tokens"]
    for g in gens:
        g.seconds = seconds
    return gens


def generate_groups(trainer, mm, tokenizer, groups: list[PromptGroup], *, batch_size: int = 8,
                    max_prompt_tokens: int = 1024) -> list[Generations] | None:
    """Generate every group through ``trainer.predict`` (sharded across its processes); rank 0 gets the
    ``Generations`` (``seconds``: the busiest rank's time inside generate, so process start-up is not counted),
    the other ranks None."""
    from torch.utils.data import DataLoader

    from pipeline.distributed import gather_to_zero

    jobs, skipped = plan_jobs(tokenizer, groups, batch_size, max_prompt_tokens)
    outputs = trainer.predict(GenerationModule(mm, tokenizer),
                              dataloaders=DataLoader(jobs, batch_size=1, collate_fn=_one_job)) if jobs else []
    outputs = list(outputs or [])
    parts = gather_to_zero((outputs, sum(o["seconds"] for o in outputs)))
    if parts is None:
        return None
    gens = assemble(groups, skipped, [o for outs, _ in parts for o in outs], max(s for _, s in parts))
    lost = [(i, k) for i, g in enumerate(gens) for k, t in enumerate(g.texts) if t is None]
    if len(lost) != sum(skipped):
        raise RuntimeError(f"{len(lost) - sum(skipped)} prompts came back from no rank")
    return gens


def generate_texts(mm, tokenizer, prompts: list[str], *, task_ids=None, batch_size: int = 8,
                   max_new_tokens: int = 16, max_prompt_tokens: int = 1024, desc: str = "generate",
                   progress: bool = True) -> Generations:
    """Greedy completions of ``prompts`` in this process (``task_ids``: one adapter name per prompt, the oracle)."""
    from tqdm.auto import tqdm

    groups = [PromptGroup(list(prompts), task_ids, max_new_tokens)]
    jobs, skipped = plan_jobs(tokenizer, groups, batch_size, max_prompt_tokens)
    t0 = time.perf_counter()
    outputs = [run_job(mm, tokenizer, j) for j in tqdm(jobs, desc=desc, disable=not progress, leave=False)]
    return assemble(groups, skipped, outputs, time.perf_counter() - t0)[0]
