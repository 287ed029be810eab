"""EOS (and every other special token) held back until a composite-n output holds n answers: a logits processor.

MeteoRA trains its adapters on prompt + answer with no EOS after the answer, so in a composite prompt its model goes
on from one answer to the next. Ours end every training answer with EOS (``data.append_eos``) so single-task
generation stops by itself; in a composite prompt that EOS ends the list after its first answer. This processor sets
EOS's logit to -inf in every row whose generated text does not yet hold n non-empty numbered answers
(``data.composite.parse_composite``), so the model must go on; once a row has them, EOS is free again.

Every token that writes no text (``silent_ids``) is held back with EOS, not EOS alone: a model denied its EOS takes
the next end-like token (SmolLM2's ``<|endoftext|>`` and ``<|im_start|>`` beside its EOS ``<|im_end|>``), which does
not stop generation and decodes to nothing (``skip_special_tokens``), so the row runs to its token budget and comes
back empty: the composite table then reads "no answers" where the model was never let write one. The other route to
the same end, adapters trained without EOS (``data.append_eos=false``), changes single-task generation too; this one
changes composite generation only.

    gate = EOSUntilAnswers(tokenizer, prompt_len=ids.shape[1], n=3)
    mm.generate(ids, ..., logits_processor=LogitsProcessorList([gate]))
"""

from __future__ import annotations

import torch
from transformers import LogitsProcessor

from data.composite import parse_composite


def silent_ids(tokenizer) -> set[int]:
    """The tokens that write no text: those ``decode(skip_special_tokens=True)`` drops, i.e. the named special
    tokens and every added token marked special (SmolLM2: 17, its ``<|endoftext|>``, ``<|im_start|>``, ``<repo_name>``
    ...; Gemma 3: some 6000, ``<unused*>`` and image tokens among them; ``all_special_ids`` names 3 and 5 of them)."""
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    return {int(i) for i in tokenizer.all_special_ids} | {int(i) for i, tok in added.items() if tok.special}


class EOSUntilAnswers(LogitsProcessor):
    """Forbid the EOS token(s) and the tokenizer's other special tokens in rows whose new text holds fewer than
    ``n`` non-empty numbered answers."""

    def __init__(self, tokenizer, prompt_len: int, n: int, eos_token_id=None):
        eos = tokenizer.eos_token_id if eos_token_id is None else eos_token_id
        eos = [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]) if e is not None]
        self.held = sorted(set(eos) | silent_ids(tokenizer))  # EOS and every other token that writes no text
        self.tokenizer, self.prompt_len, self.n = tokenizer, int(prompt_len), int(n)
        self.done: set[int] = set()  # rows that hold n answers already: a row's answers only grow, so it keeps them
        self._held_on: dict = {}  # (device, vocabulary width) -> ``held`` as a tensor there (made once)

    def answered(self, text: str) -> int:
        return sum(1 for a in parse_composite(text, self.n) if a.strip())

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if not self.held:
            return scores
        if input_ids.shape[1] <= self.prompt_len:  # a generation starts (the processor may serve more than one)
            self.done = set()
        rows = [b for b in range(input_ids.shape[0]) if b not in self.done]  # decode only rows still short
        texts = self.tokenizer.batch_decode(input_ids[rows, self.prompt_len:], skip_special_tokens=True) if rows else []
        short = []
        for b, t in zip(rows, texts, strict=True):
            if self.answered(t) < self.n:
                short.append(b)
            else:
                self.done.add(b)
        if short:
            scores = scores.clone()
            key = (scores.device, scores.shape[1])
            if key not in self._held_on:
                self._held_on[key] = torch.tensor([e for e in self.held if e < scores.shape[1]], device=scores.device)
            scores[torch.tensor(short, device=scores.device)[:, None], self._held_on[key]] = float("-inf")
        return scores


__all__ = ["EOSUntilAnswers", "silent_ids"]
