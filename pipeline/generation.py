"""Batched greedy generation through a ``MultiLoRAModel``: left padding, KV cache, one route per batch.

Prompts are sorted by length so each batch pads little, generated in batches, and returned in input order.
Each prompt is encoded exactly as training encoded it (``encode_prompt``); prompts longer than
``max_prompt_tokens`` are skipped and counted (MeteoRA skips prompts over 4096 tokens), their prediction None.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch


@dataclass
class Generations:
    """Outputs in input order (None = skipped), sentence routes where the router made one, and timing."""

    texts: list
    routes: list = field(default_factory=list)
    skipped: int = 0
    seconds: float = 0.0
    new_tokens: int = 0


def left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ``input_ids`` and ``attention_mask`` (the last column is every row's last real token)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[i, width - len(s):] = 1
    return ids, mask


def generate_texts(mm, tokenizer, prompts: list[str], *, task_ids=None, batch_size: int = 8,
                   max_new_tokens: int = 16, max_prompt_tokens: int = 1024, desc: str = "generate",
                   progress: bool = True) -> Generations:
    """Greedy completions of ``prompts`` (``task_ids``: one adapter name per prompt, for the oracle)."""
    from tqdm.auto import tqdm

    from pipeline.answer_batches import encode_prompt

    enc = [encode_prompt(tokenizer, p) for p in prompts]
    keep = [i for i, e in enumerate(enc) if 0 < len(e) <= max_prompt_tokens]
    order = sorted(keep, key=lambda i: len(enc[i]))
    out = Generations(texts=[None] * len(prompts), routes=[None] * len(prompts), skipped=len(prompts) - len(keep))
    device = next(mm.parameters()).device
    t0 = time.perf_counter()
    batches = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
    for batch in tqdm(batches, desc=desc, disable=not progress, leave=False):
        ids, mask = left_pad([enc[i] for i in batch], tokenizer.pad_token_id)
        kw = {"task_ids": [task_ids[i] for i in batch]} if task_ids is not None else {}
        gen = mm.generate(ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                          do_sample=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                          **kw)
        new = gen[:, ids.shape[1]:]
        route = mm.last_route()
        for row, i in enumerate(batch):
            toks = new[row]
            out.new_tokens += int((toks != tokenizer.pad_token_id).sum())
            out.texts[i] = tokenizer.decode(toks, skip_special_tokens=True).strip()
            if route is not None:
                rid, rw = route
                out.routes[i] = {"ids": rid[row].tolist(), "weights": [round(float(w), 4) for w in rw[row]]}
    out.seconds = time.perf_counter() - t0
    return out
