"""Prompt/answer rows -> token batches: answer-only training batches, and left-padded generation jobs.

A causal LM fine-tuned on ``prompt + answer`` should learn to produce the answer, not to predict the prompt, so
labels are ``-100`` (ignored by the loss) on every prompt and padding position. Rows are right-padded for
training (positions stay 0..n-1 for real tokens); generation uses the tokenizer's left padding instead.

    enc = encode_pair(tok, "Q: 2+2?\nA:", " 4", max_length=256)   # {"input_ids", "labels"}
    batch = AnswerOnlyCollator(tok.pad_token_id)([enc, ...])      # padded tensors + attention_mask

Routers: ``routed_rows`` labels each task's rows with the task's adapter index (``RoutedRowsCollator`` batches them).

Generation: prompts of a ``PromptGroup`` are encoded exactly as training encoded them (``encode_prompts``), sorted by
length so each batch pads little, and cut into *jobs* (``plan_jobs``: one ``generate`` call each, left-padded by
``left_pad`` so the last column is every row's last real token); prompts longer than ``max_prompt_tokens`` are
skipped and counted (MeteoRA skips prompts over 4096 tokens), their prediction None. ``assemble`` puts job outputs
(any order, from any rank) back into input order.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from data.task_rows import task_rows


def encode_prompts(tokenizer, prompts: list[str]) -> list[list[int]]:
    """Token ids of prompts exactly as training saw them (no special tokens added; the task template is the whole
    prompt). Evaluation must encode prompts with this same function. One batched tokenizer call: a fast tokenizer
    encodes a batch in parallel, to the same ids as one call per prompt, where a call per prompt costs a
    millisecond of dispatch on a long prompt (28 tasks x 1000 rows: tens of seconds at every stage's start)."""
    if not prompts:
        return []
    return tokenizer(list(prompts), add_special_tokens=False)["input_ids"]


def encode_pairs(tokenizer, prompts: list[str], answers: list[str], max_length: int,
                 append_eos: bool = True) -> list[dict]:
    """For each (prompt, answer): ``input_ids`` = prompt + answer (+ EOS), ``labels`` = -100 on the prompt, the
    answer ids on the answer; prompts and answers each encoded in one batched call (``encode_prompts``).

    Too long: the prompt loses tokens from its left (the question's end stays next to the answer); an answer
    longer than ``max_length`` alone is cut on the right.
    """
    eos = [tokenizer.eos_token_id] if append_eos and tokenizer.eos_token_id is not None else []
    out = []
    for p, a in zip(encode_prompts(tokenizer, prompts), encode_prompts(tokenizer, answers), strict=True):
        a = (a + eos)[:max_length]
        keep = max_length - len(a)
        p = p[len(p) - keep:] if keep > 0 else []
        out.append({"input_ids": p + a, "labels": [-100] * len(p) + a})
    return out


def encode_pair(tokenizer, prompt: str, answer: str, max_length: int, append_eos: bool = True) -> dict:
    """``encode_pairs`` of one (prompt, answer)."""
    return encode_pairs(tokenizer, [prompt], [answer], max_length, append_eos)[0]


class AnswerOnlyCollator:
    """Right-pad a list of ``encode_pair`` outputs into ``input_ids``, ``attention_mask`` and ``labels``."""

    def __init__(self, pad_token_id: int):
        self.pad = int(pad_token_id)

    def __call__(self, rows: list[dict]) -> dict:
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), width), self.pad, dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[i, :n] = torch.tensor(r["input_ids"])
            labels[i, :n] = torch.tensor(r["labels"])
            mask[i, :n] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@dataclass
class PromptGroup:
    """Prompts generated with the same settings (one task, or the composite prompts)."""

    prompts: list
    task_ids: list | None = None  # one adapter name per prompt (the oracle), else None
    max_new_tokens: int = 16
    min_answers: int | None = None  # composite-n: EOS held back until n numbered answers (pipeline.stages.eos_gate)
    no_repeat_ngram_size: int | None = None  # no n-gram twice in a row (pipeline.stages.no_repeat; None: off)


@dataclass
class Generations:
    """Outputs in input order (None = skipped), sentence routes where the router made one, how each row ended
    (``ends``: ``{"new_tokens", "eos"}``, None = skipped), and timing: ``seconds`` the whole set's generation time,
    ``own_seconds`` this group's generate calls (summed over ranks)."""

    texts: list
    routes: list = field(default_factory=list)
    ends: list = field(default_factory=list)
    skipped: int = 0
    seconds: float = 0.0
    new_tokens: int = 0
    max_new_tokens: int = 0
    own_seconds: float = 0.0


def left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ``input_ids`` and ``attention_mask`` (the last column is every row's last real token)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[i, width - len(s):] = 1
    return ids, mask


def plan_jobs(tokenizer, groups: list[PromptGroup], batch_size: int, max_prompt_tokens: int,
              max_batch_tokens: int | None = None, context: int | None = None):
    """``(jobs, skipped per group)``: each job is one generate call, ``{"group", "indices", "input_ids", ...}``.

    A prompt is skipped (counted, never generated) when it is longer than ``max_prompt_tokens``, or, with
    ``context`` (the model's positions, ``max_position_embeddings``), when it and the group's ``max_new_tokens``
    would run past them: the model would write its answer at positions it was never trained on. (MeteoRA's
    generate bounds prompt + answer by ``max_length``, which cuts the answer short; skipping keeps every scored
    answer whole.)

    A job holds at most ``batch_size`` prompts of one group (shortest first) and, with ``max_batch_tokens``, at
    most that many KV-cache positions: its rows x (its longest prompt + the group's ``max_new_tokens``), what a
    static cache of the graph decode allocates and what a dynamic one grows to. A prompt over the bound alone is a
    job of one. Long prompts thus come in smaller jobs than short ones (SmolLM2 in bf16 holds 23 KB of keys and
    values per position: 256 prompts of 4096 tokens with 574 new ones would hold 28 GB)."""
    jobs, skipped = [], []
    for g, group in enumerate(groups):
        enc = encode_prompts(tokenizer, group.prompts)
        new = int(group.max_new_tokens)
        keep = [i for i, e in enumerate(enc)
                if 0 < len(e) <= max_prompt_tokens and (context is None or len(e) + new <= context)]
        order = sorted(keep, key=lambda i: len(enc[i]))
        skipped.append(len(enc) - len(keep))
        start = 0
        while start < len(order):
            end = start + 1  # rows order[start:end]; the next one is the longest if it joins (shortest first)
            while end < len(order) and end - start < batch_size and (
                    max_batch_tokens is None or (end - start + 1) * (len(enc[order[end]]) + new) <= max_batch_tokens):
                end += 1
            batch = order[start:end]
            jobs.append({"group": g, "indices": batch, "input_ids": [enc[i] for i in batch],
                         "task_ids": [group.task_ids[i] for i in batch] if group.task_ids is not None else None,
                         "max_new_tokens": new, "min_answers": group.min_answers,
                         "no_repeat_ngram_size": group.no_repeat_ngram_size})
            start = end
    return jobs, skipped


def assemble(groups: list[PromptGroup], skipped: list[int], outputs: list[dict], seconds: float) -> list[Generations]:
    """Job outputs (any order, from any rank) -> one ``Generations`` per group, in input order; ``seconds`` is the
    generation time of the whole set (each group's share of it is in ``new_tokens``)."""
    gens = [Generations(texts=[None] * len(g.prompts), routes=[None] * len(g.prompts), ends=[None] * len(g.prompts),
                        skipped=s, max_new_tokens=int(g.max_new_tokens)) for g, s in zip(groups, skipped)]
    for out in outputs:
        g = gens[out["group"]]
        ends = out.get("ends") or [None] * len(out["indices"])
        for i, text, route, end in zip(out["indices"], out["texts"], out["routes"], ends, strict=True):
            if g.texts[i] is not None:
                raise RuntimeError(f"prompt {i} of group {out['group']} was generated twice")
            g.texts[i], g.routes[i], g.ends[i] = text, route, end
        g.new_tokens += out["new_tokens"]
        g.own_seconds += out["seconds"]
    for g in gens:
        g.seconds = seconds
    return gens


class RoutedRowsCollator:
    """Rows with a task index -> right-padded ``input_ids``, ``attention_mask``, ``labels``, ``task_ids``; with
    ``answer_mask``, also ``answer_mask`` [B, S] (1 on each row's answer tokens, from ``prompt_len``, as
    ``routed_rows`` writes it), where a token router's accuracy is split into the prompt's and the answer's; with
    ``gate_ce_mask``, the same mask as ``gate_ce_mask``: the tokens a token router's CE is taken over while it
    trains (``router.train.gate_ce_on_prompt=false``: the answers alone)."""

    def __init__(self, pad_token_id: int, answer_mask: bool = False, gate_ce_mask: bool = False):
        self.pad = AnswerOnlyCollator(pad_token_id)
        self.answer_mask, self.gate_ce_mask = answer_mask, gate_ce_mask

    def __call__(self, rows):
        batch = self.pad(rows)
        batch["task_ids"] = torch.tensor([r["task_id"] for r in rows], dtype=torch.long)
        if self.answer_mask or self.gate_ce_mask:
            mask = torch.zeros_like(batch["attention_mask"])
            for i, r in enumerate(rows):
                mask[i, r["prompt_len"]:len(r["input_ids"])] = 1
            if self.answer_mask:
                batch["answer_mask"] = mask
            if self.gate_ce_mask:
                batch["gate_ce_mask"] = mask.clone()
        return batch


#: what a padded position holds, per key of a collated batch (any other [B, S] key: 0)
PAD_VALUES = {"attention_mask": 0, "labels": -100, "task_ids": 0}


def pad_to_shape(batch: dict, rows: int, multiple: int, pad_token_id: int) -> dict:
    """A right-padded batch grown to ``rows`` rows and a width rounded up to a multiple of ``multiple``, for a
    step captured per shape (``pipeline.runtime.step_graph``): added columns and rows are padding (``input_ids``
    the pad token, ``attention_mask`` 0, ``labels`` -100; an added row's ``task_ids`` 0), which no loss or
    count reads: the step's loss, gradients and counts are the unpadded batch's. Shapes come from the host; on
    the device, no value is read back."""
    ids = batch["input_ids"]
    b, width = ids.shape
    if b > rows:
        raise ValueError(f"a batch of {b} rows cannot be padded to {rows}")
    new_width = -(-width // multiple) * multiple
    out = {}
    for k, v in batch.items():
        if not torch.is_tensor(v):
            out[k] = v
            continue
        fill = pad_token_id if k == "input_ids" else PAD_VALUES.get(k, 0)
        if v.dim() == 2 and v.shape == (b, width):
            out[k] = torch.nn.functional.pad(v, (0, new_width - width, 0, rows - b), value=fill)
        elif v.dim() == 1 and v.shape[0] == b:
            out[k] = torch.nn.functional.pad(v, (0, rows - b), value=fill)
        else:
            raise ValueError(f"pad_to_shape: batch[{k!r}] of shape {tuple(v.shape)} is neither [B] nor [B, S]")
    return out


def routed_rows_settings(cfg, tokenizer, prompt_only: bool) -> dict:
    """The keyword arguments of ``routed_rows`` that a route run's composed config sets (its ``tasks``,
    ``router.train``, ``data`` and ``seed``; a DictConfig or the plain dict of a committed ``config.yaml``): one
    reading for the stage and for whoever rebuilds its rows from a record (``data.routing_ceiling``)."""
    tr, data = cfg["router"]["train"], cfg["data"]
    return {"tokenizer": tokenizer, "tasks": [str(t) for t in cfg["tasks"]], "max_length": int(tr["max_length"]),
            "prompt_only": bool(prompt_only), "lm_loss_on_prompt": bool(tr["lm_loss_on_prompt"]),
            "append_eos": bool(data["append_eos"]), "split_seed": int(data["split_seed"]), "seed": int(cfg["seed"])}


def routed_rows(tokenizer, tasks, split: str, per_task: int, *, max_length: int, prompt_only: bool,
                lm_loss_on_prompt: bool = True, append_eos: bool = True, split_seed: int = 0, seed: int = 0) -> list:
    """A router's training rows: ``per_task`` rows of each task's ``split``, each labelled with its task's index in
    ``tasks`` (``task_id``), shuffled together with ``seed``. ``prompt_only``: the prompt alone (a sentence
    classifier); else prompt + answer with answer labels, or labels on every token with ``lm_loss_on_prompt``
    (MeteoRA's LM loss covers the prompt too). Each row's ``prompt_len`` is its prompt's token count (all of a
    ``prompt_only`` row): its answer tokens start there."""
    rows = []
    for idx, task in enumerate(tasks):
        task_rows_ = task_rows(str(task), split, per_task, split_seed)
        prompts = [r["prompt"] for r in task_rows_]
        if prompt_only:
            cut = [ids[:max_length] for ids in encode_prompts(tokenizer, prompts)]
            encs = [{"input_ids": ids, "labels": [-100] * len(ids), "prompt_len": len(ids)} for ids in cut]
        else:
            encs = encode_pairs(tokenizer, prompts, [r["answer"] for r in task_rows_], max_length, append_eos)
            for enc in encs:
                enc["prompt_len"] = enc["labels"].count(-100)  # encode_pairs: -100 on the prompt alone
                if lm_loss_on_prompt:
                    enc["labels"] = list(enc["input_ids"])
        rows.extend({**enc, "task_id": idx} for enc in encs)
    random.Random(seed).shuffle(rows)
    return rows
