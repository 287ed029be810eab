"""Prompt/answer rows -> token batches where only answer tokens carry loss.

A causal LM fine-tuned on ``prompt + answer`` should learn to produce the answer, not to predict the prompt, so
labels are ``-100`` (ignored by the loss) on every prompt and padding position. Rows are right-padded for
training (positions stay 0..n-1 for real tokens); generation uses the tokenizer's left padding instead.

    enc = encode_pair(tok, "Q: 2+2?\nA:", " 4", max_length=256)   # {"input_ids", "labels"}
    batch = AnswerOnlyCollator(tok.pad_token_id)([enc, ...])      # padded tensors + attention_mask
"""

from __future__ import annotations

import torch


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """Token ids of a prompt exactly as training saw it (no special tokens added; the task template is the
    whole prompt). Evaluation must encode prompts with this same function."""
    return tokenizer(prompt, add_special_tokens=False)["input_ids"]


def encode_pair(tokenizer, prompt: str, answer: str, max_length: int, append_eos: bool = True) -> dict:
    """``input_ids`` = prompt + answer (+ EOS), ``labels`` = -100 on the prompt, the answer ids on the answer.

    Too long: the prompt loses tokens from its left (the question's end stays next to the answer); an answer
    longer than ``max_length`` alone is cut on the right.
    """
    p = encode_prompt(tokenizer, prompt)
    a = tokenizer(answer, add_special_tokens=False)["input_ids"]
    if append_eos and tokenizer.eos_token_id is not None:
        a = a + [tokenizer.eos_token_id]
    a = a[:max_length]
    keep = max_length - len(a)
    p = p[len(p) - keep:] if keep > 0 else []
    return {"input_ids": p + a, "labels": [-100] * len(p) + a}


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
