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

MOD = (1 << 61) - 1  # a Mersenne prime: the rolling hash's modulus (a false ban needs a 61-bit collision)
BASE = 1_000_003  # the hash's base (more than any vocabulary's size)


class NoRepeatNGram(LogitsProcessor):
    """Ban, per row, every token that would repeat an n-gram of the row (prompt and new tokens alike).

    Each row keeps a table from the hash of an (n - 1)-token key to the tokens that followed it, and the hash of its
    last n - 1 tokens, rolled forward one token at a time (polynomial, modulo a 61-bit prime): a new token costs a
    few integer operations and one set insert, not a tuple of n - 1 tokens."""

    def __init__(self, n: int):
        if int(n) < 1:
            raise ValueError(f"no_repeat_ngram_size={n} must be >= 1 (or null: off)")
        self.n, self.k = int(n), int(n) - 1
        self.top = pow(BASE, max(self.k - 1, 0), MOD)  # the weight of a key's oldest token
        self.length = 0  # tokens of each row already in the tables
        self.tables: list[dict] | None = None  # per row: key hash -> the tokens that followed that key
        self.seqs: list[list[int]] = []  # per row: its tokens so far
        self.keys: list[int] = []  # per row: the hash of its last min(n - 1, length) tokens

    def _add(self, row: int, tokens: list[int]) -> None:
        """Add the n-grams that ``tokens`` (the row's next tokens) complete, rolling the row's key along."""
        table, seq, key, k = self.tables[row], self.seqs[row], self.keys[row], self.k
        for t in tokens:
            if len(seq) >= k:  # a full key precedes t: (key, t) is an n-gram of the row
                table.setdefault(key, set()).add(t)
            if k:
                if len(seq) >= k:  # the oldest token leaves the key
                    key = (key - (seq[-k] + 1) * self.top) % MOD
                key = (key * BASE + t + 1) % MOD  # + 1: token 0 still weighs
            seq.append(t)
        self.keys[row] = key

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        rows, length = input_ids.shape
        if self.tables is None or length < self.length or rows != len(self.tables):  # another call: its own prompt
            self.tables, self.seqs, self.keys = [{} for _ in range(rows)], [[] for _ in range(rows)], [0] * rows
            self.length = 0
        new = input_ids[:, self.length:].tolist()
        for r in range(rows):
            self._add(r, new[r])
        self.length = length
        if length + 1 < self.n:  # no n-gram can be completed yet (transformers' rule)
            return scores
        ban_rows, ban_ids = [], []
        for r in range(rows):
            for t in self.tables[r].get(self.keys[r], ()):
                ban_rows.append(r)
                ban_ids.append(t)
        if ban_rows:
            scores = scores.clone()
            scores[torch.tensor(ban_rows, device=scores.device), torch.tensor(ban_ids, device=scores.device)] = \
                -float("inf")
        return scores
