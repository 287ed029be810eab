"""No n-gram twice: MeteoRA's ``no_repeat_ngram_size`` (30 in its evaluation), as a logits processor that counts
incrementally.

At each decode step a row may not write a token that would complete an n-gram it already holds, the prompt
included: with the row's last ``n - 1`` tokens as the key, every token that followed that key before is banned
(its logit set to -inf). transformers' own ``NoRepeatNGramLogitsProcessor`` does the same but rebuilds each row's
n-gram table from the whole sequence at every step, in Python: for composite-10's 5k-8k-token prompts and a few
hundred new tokens that is billions of tuple operations per batch. This one builds the table once from the prompt
and adds the one n-gram each new token completes, so a step costs a lookup per row. Its choices equal
transformers' at every step (a test runs both on random sequences).

    ban = NoRepeatNGram(30)
    mm.generate(ids, ..., logits_processor=LogitsProcessorList([ban]))   # one instance per generate call

(An instance called again with a shorter sequence or another number of rows starts afresh; one called for another
prompt of the same shape would keep the first prompt's n-grams: make one per call, as evaluate's ``run_job`` does.)

MeteoRA generates with it everywhere; here ``generation.no_repeat_ngram_size`` (null: off) turns it on, and the
MeteoRA experiments set 30. It matters where a model loops (composite rows whose EOS is held back): a loop longer
than n tokens cannot repeat.
"""

from __future__ import annotations

import torch
from transformers import LogitsProcessor


class NoRepeatNGram(LogitsProcessor):
    """Ban, per row, every token that would repeat an n-gram of the row (prompt and new tokens alike)."""

    def __init__(self, n: int):
        if int(n) < 1:
            raise ValueError(f"no_repeat_ngram_size={n} must be >= 1 (or null: off)")
        self.n = int(n)
        self.length = 0  # tokens of each row already in the tables
        self.tables: list[dict] | None = None  # per row: key (its n - 1 tokens) -> the tokens that followed it
        self.tails: list[list[int]] = []  # per row: its last n - 1 tokens

    def _add(self, row: int, tokens: list[int]) -> None:
        """Add the n-grams that ``tokens`` (the row's next tokens) complete to the row's table."""
        table, seq, k = self.tables[row], self.tails[row] + tokens, self.n - 1
        for end in range(max(k, len(self.tails[row])), len(seq)):
            table.setdefault(tuple(seq[end - k:end]), set()).add(seq[end])
        self.tails[row] = seq[-k:] if k else []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        rows, length = input_ids.shape
        if self.tables is None or length < self.length or rows != len(self.tables):  # another call: its own prompt
            self.tables, self.tails, self.length = [{} for _ in range(rows)], [[] for _ in range(rows)], 0
        new = input_ids[:, self.length:].tolist()
        for r in range(rows):
            self._add(r, new[r])
        self.length = length
        if length + 1 < self.n:  # no n-gram can be completed yet (transformers' rule)
            return scores
        k = self.n - 1
        ban_rows, ban_ids = [], []
        for r in range(rows):
            key = tuple(self.tails[r][-k:]) if k else ()
            for t in self.tables[r].get(key, ()):
                ban_rows.append(r)
                ban_ids.append(t)
        if ban_rows:
            scores = scores.clone()
            scores[torch.tensor(ban_rows, device=scores.device), torch.tensor(ban_ids, device=scores.device)] = \
                -float("inf")
        return scores
