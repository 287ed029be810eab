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

It runs on the host at every decode step, so it counts incrementally: a row's answers are its complete lines' (parsed
once, when the token that ends them arrives) plus its open line's (decoded from the token holding the last line
break on). Decoding every row's whole output at every step instead cost 3 to 9 ms per step for 40 rows of 100 to 600
new tokens (SmolLM2's tokenizer, this CPU), more than a graph-replayed decode step of the GPU. The count equals
``answered(decode(output))`` at every step (``data.composite.parse_report`` reads line by line; a test checks it
on random outputs with both tokenizers).
"""

from __future__ import annotations

import torch
from transformers import LogitsProcessor

from data.composite import numbered_lines, parse_composite


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
        self._rows: dict[int, _Row] = {}  # per row still short: its new tokens and its complete lines' answers
        self._breaks: dict[int, bool] = {}  # token id -> whether it writes a line break (made once per id)
        self._held_on: dict = {}  # (device, vocabulary width) -> ``held`` as a tensor there (made once)

    def answered(self, text: str) -> int:
        return sum(1 for a in parse_composite(text, self.n) if a.strip())

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if not self.held:
            return scores
        if input_ids.shape[1] <= self.prompt_len:  # a generation starts (the processor may serve more than one)
            self.done, self._rows = set(), {}
        rows = [b for b in range(input_ids.shape[0]) if b not in self.done]
        short = []
        if rows and input_ids.shape[1] > self.prompt_len:
            newest = input_ids[rows, -1].tolist()  # one host read per step: the token each row took last
            for b, t in zip(rows, newest, strict=True):
                if self._count(b, t, input_ids) < self.n:
                    short.append(b)
                else:
                    self.done.add(b)
                    self._rows.pop(b, None)
        elif rows:
            short = rows
        if short:
            scores = scores.clone()
            key = (scores.device, scores.shape[1])
            if key not in self._held_on:
                self._held_on[key] = torch.tensor([e for e in self.held if e < scores.shape[1]], device=scores.device)
            scores[torch.tensor(short, device=scores.device)[:, None], self._held_on[key]] = float("-inf")
        return scores

    def _count(self, b: int, newest: int, input_ids) -> int:
        """Row ``b``'s answers after its newest token: its complete lines' plus its open line's."""
        row = self._rows.setdefault(b, _Row())
        if len(row.tokens) != input_ids.shape[1] - self.prompt_len - 1:  # a step this gate did not see: read them
            row.tokens = input_ids[b, self.prompt_len:-1].tolist()
            row.last_break = max((i for i, t in enumerate(row.tokens) if self._writes_break(t)), default=None)
            row.found = self._complete(row)
        row.tokens.append(int(newest))
        if self._writes_break(newest):
            row.last_break = len(row.tokens) - 1
            row.found = self._complete(row)
        start = row.last_break if row.last_break is not None else 0
        tail = self.tokenizer.decode(row.tokens[start:], skip_special_tokens=True)
        line = tail[tail.rfind("\n") + 1:] if row.last_break is not None else tail
        return sum(1 for a in _first_answers(line, self.n, row.found).values() if a.strip())

    def _complete(self, row: _Row) -> dict[int, str]:
        """The first answer to each number 1..n in the row's complete lines (those before its last line break)."""
        if row.last_break is None:
            return {}
        text = self.tokenizer.decode(row.tokens[:row.last_break + 1], skip_special_tokens=True)
        return _first_answers(text[:text.rfind("\n")], self.n)

    def _writes_break(self, token: int) -> bool:
        if token not in self._breaks:
            self._breaks[token] = "\n" in self.tokenizer.decode([token], skip_special_tokens=True)
        return self._breaks[token]


class _Row:
    """One generating row's state in ``EOSUntilAnswers``: its new tokens, the index of the last one that writes a
    line break (None: none yet), and the answers of the lines before that break."""

    def __init__(self):
        self.tokens: list[int] = []
        self.last_break: int | None = None
        self.found: dict[int, str] = {}


def _first_answers(text: str, n: int, before: dict[int, str] | None = None) -> dict[int, str]:
    """``before`` (the answers of the lines ahead of ``text``) with the first answer ``text`` gives each number in
    1..n that ``before`` lacks, as ``data.composite.parse_report`` reads a whole output (a repeated number's first
    answer is the one that counts)."""
    found = dict(before or {})
    for number, answer in numbered_lines(text):
        if 1 <= number <= n:
            found.setdefault(number, answer)
    return found


__all__ = ["EOSUntilAnswers", "silent_ids"]
