"""EOS held back until a composite-n output holds n answers (pipeline.stages.eos_gate), on the real SmolLM2 tokenizer and
the tiny random LLaMA's real `generate`."""

from __future__ import annotations

import pytest
import torch
from needs_assets import needs_tiny_model
from transformers import LogitsProcessorList

from data.assets import cache_dir
from pipeline.stages.eos_gate import EOSUntilAnswers, silent_ids


def _model():
    from models import load_base_model

    return load_base_model(cache_dir() / "models" / "tiny-random-llama")


@needs_tiny_model
def test_eos_is_forbidden_until_every_answer_is_there():
    _, tok = _model()
    prompt = tok("Following the example above:\n", add_special_tokens=False)["input_ids"]
    outputs = ["1. yes\n2.", "1. yes\n2. no\n3. ", "1. yes\n2. no\n3. maybe", "3. c\n1. a\n2. b"]
    gate = EOSUntilAnswers(tok, prompt_len=len(prompt), n=3)
    eos = tok.eos_token_id
    special = sorted(silent_ids(tok) | {eos})
    assert set(tok.all_special_ids) < set(special)  # SmolLM2's tokenizer: 17 special added tokens, 3 named ones
    assert all(tok.decode([i], skip_special_tokens=True) == "" for i in special)  # none of them writes text
    blocked = []
    for text in outputs:
        ids = torch.tensor([prompt + tok(text, add_special_tokens=False)["input_ids"]])
        scores = gate(ids, torch.zeros(1, len(tok)))
        inf = torch.isinf(scores[0])
        blocked.append(bool(inf[eos]))
        assert inf[special].tolist() == [blocked[-1]] * len(special)  # every special token with EOS
        assert inf.sum() == (len(special) if blocked[-1] else 0)  # and no ordinary token
    assert blocked == [True, True, False, False]


@needs_tiny_model
def test_generation_goes_on_past_eos_until_n_answers():
    """A model made to prefer EOS stops at once; with the gate it must keep generating (a random model never
    writes three numbered answers, so it runs to max_new_tokens)."""
    model, tok = _model()
    ids = tok(["[INST] 1+1? [/INST]\n"], return_tensors="pt", add_special_tokens=False)
    kw = {"max_new_tokens": 12, "do_sample": False, "pad_token_id": tok.pad_token_id, "eos_token_id": tok.eos_token_id,
          "sequence_bias": {(tok.eos_token_id,): 1e4}}
    plain = model.generate(**ids, **kw)
    assert plain.shape[1] - ids["input_ids"].shape[1] <= 1  # EOS first
    gate = EOSUntilAnswers(tok, ids["input_ids"].shape[1], n=3)
    gated = model.generate(**ids, **kw, logits_processor=LogitsProcessorList([gate]))
    new = gated[0, ids["input_ids"].shape[1]:]
    assert len(new) == 12 and tok.eos_token_id not in new.tolist()


@needs_tiny_model
def test_generation_does_not_escape_through_another_special_token():
    """Denied EOS, a model takes the next end-like token (here every special token is made likelier than any
    text): it writes nothing, so the row would run to max_new_tokens and come back empty. The gate holds them all
    back, so the row writes text."""
    model, tok = _model()
    ids = tok(["[INST] 1+1? [/INST]\n"], return_tensors="pt", add_special_tokens=False)
    special = sorted(silent_ids(tok) | {tok.eos_token_id})
    bias = {(s,): 1e4 * (2.0 if s == tok.eos_token_id else 1.0) for s in special}
    gate = EOSUntilAnswers(tok, ids["input_ids"].shape[1], n=3)
    gated = model.generate(**ids, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id,
                           eos_token_id=tok.eos_token_id, sequence_bias=bias,
                           logits_processor=LogitsProcessorList([gate]))
    new = gated[0, ids["input_ids"].shape[1]:].tolist()
    assert len(new) == 12 and not set(new) & set(special)
    assert tok.decode(new, skip_special_tokens=True)  # text (this random model writes line breaks)


@needs_tiny_model
def test_plan_jobs_carry_the_answer_count():
    from data.batches import PromptGroup, plan_jobs

    _, tok = _model()
    groups = [PromptGroup(["1. a", "2. b c"], None, 8, min_answers=3), PromptGroup(["d"], None, 4)]
    jobs, _ = plan_jobs(tok, groups, 8, 100)
    assert [j["min_answers"] for j in jobs] == [3, None]


def test_a_row_end_says_whether_it_stopped_by_eos_and_after_how_many_tokens():
    from data.batches import Generations
    from pipeline.stages.evaluate import no_text_at_budget, row_end

    eos, pad = 2, 0
    assert row_end([5, 6, eos, eos], eos, pad) == {"new_tokens": 2, "eos": True}
    assert row_end([eos, eos], eos, eos) == {"new_tokens": 0, "eos": True}  # pad = EOS (SmolLM2)
    assert row_end([5, 6, 7], eos, pad) == {"new_tokens": 3, "eos": False}  # the whole budget
    assert row_end([5, pad, pad], eos, pad) == {"new_tokens": 1, "eos": False}  # stopped by another stop token
    assert row_end([1, 1, 1], eos, pad) == {"new_tokens": 3, "eos": False}
    g = Generations(texts=["", "", "x", None, ""], max_new_tokens=3,
                    ends=[row_end([1, 1, 1], eos, pad), row_end([eos], eos, pad), row_end([5, 6, 7], eos, pad), None,
                          row_end([1, pad, pad], eos, pad)])
    assert no_text_at_budget([g]) == 1  # only the row that looped on a special token to its budget


@pytest.mark.parametrize("name", ["SmolLM2-135M-Instruct", "gemma-3-270m"])
def test_silent_ids_are_exactly_the_tokens_decode_drops(name):
    """Every token of the vocabulary that decodes to nothing with skip_special_tokens is held back, and no other."""
    from transformers import AutoTokenizer

    path = cache_dir() / "models" / name
    if not (path / "tokenizer.json").exists():
        pytest.skip(f"{name} is not in the asset cache (make assets)")
    tok = AutoTokenizer.from_pretrained(path)
    ids = sorted(silent_ids(tok))
    assert all(tok.decode([i], skip_special_tokens=True) == "" for i in ids)
    assert set(tok.all_special_ids) <= set(ids) and len(ids) > len(tok.all_special_ids)
    added = sorted(set(tok.added_tokens_decoder) - set(ids))  # added tokens left free write text
    assert all(tok.decode([i], skip_special_tokens=True) != "" for i in added)


@pytest.mark.parametrize("name", ["SmolLM2-135M-Instruct", "gemma-3-270m"])
def test_the_incremental_count_equals_parsing_the_whole_output_at_every_step(name):
    """The gate counts a row's answers incrementally (complete lines once, then the open line); at every step of
    random outputs made of numbered-list pieces (numbers, dots, line breaks, words, decimals, a repeated or empty
    number, a multi-byte character, a special token) it holds back exactly the rows that parsing the whole decoded
    output says are short, a row once complete staying free."""
    import random

    from transformers import AutoTokenizer

    path = cache_dir() / "models" / name
    if not (path / "tokenizer.json").exists():
        pytest.skip(f"{name} is not in the asset cache (make assets)")
    tok = AutoTokenizer.from_pretrained(path)
    pieces = ["1.", "2.", " 3.", "3.", "\n", "\n\n", " yes", "no", "12.", ".", " ", "é", "3.5", " Answer", "\t",
              "2. b\n", "\n1.", " four", "7", "0.", "\n1. yes", "\n2. no", "\n3. maybe", "\n2.", "\n3."]
    pieces = [tok(p, add_special_tokens=False)["input_ids"] for p in pieces] + [[tok.eos_token_id]]
    rng = random.Random(0)
    n, rows, steps, prompt = 3, 8, 60, [tok.eos_token_id] * 3
    outs = []
    for _ in range(rows):
        seq = []
        while len(seq) < steps:
            seq += rng.choice(pieces)
        outs.append(seq[:steps])
    gate = EOSUntilAnswers(tok, prompt_len=len(prompt), n=n)
    done = [False] * rows
    for k in range(steps + 1):
        ids = torch.tensor([prompt + o[:k] for o in outs])
        blocked = torch.isinf(gate(ids, torch.zeros(rows, len(tok)))[:, tok.eos_token_id]).tolist()
        for b in range(rows):
            done[b] = done[b] or gate.answered(tok.decode(outs[b][:k], skip_special_tokens=True)) >= n
        assert blocked == [not d for d in done], (k, blocked, done)
    assert 0 < sum(done) < rows  # some rows complete along the way, some never
