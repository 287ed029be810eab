"""pipeline.stages.no_repeat: MeteoRA's no_repeat_ngram_size, counted incrementally, choosing what transformers'
own processor chooses, and reaching evaluate's generation through ``generation.no_repeat_ngram_size``."""

from __future__ import annotations

import pytest
import torch
from transformers import NoRepeatNGramLogitsProcessor

from pipeline.stages.no_repeat import NoRepeatNGram


@pytest.mark.parametrize("n", [1, 2, 3, 5, 30])
@pytest.mark.parametrize("vocab", [3, 7])
def test_bans_what_transformers_bans_at_every_step(n, vocab):
    """Random prompts (left part shorter than n for n = 30), then 40 steps of greedy choices through both: the
    processed scores are equal at every step, prompt n-grams included; a small vocabulary makes repeats, and
    so bans, frequent."""
    g = torch.Generator().manual_seed(n * 10 + vocab)
    ids = torch.randint(0, vocab, (4, 12), generator=g)
    mine, ref = NoRepeatNGram(n), NoRepeatNGramLogitsProcessor(n)
    banned = 0
    for _ in range(40):
        scores = torch.randn(4, vocab, generator=g)
        a, b = mine(ids, scores.clone()), ref(ids, scores.clone())
        assert torch.equal(a, b)
        banned += int(torch.isinf(a).sum())
        nxt = torch.where(torch.isinf(a).all(-1), torch.zeros(4, dtype=torch.long), a.argmax(-1))
        ids = torch.cat([ids, nxt[:, None]], 1)
    assert banned > 0 or n == 30  # the test bans something (n = 30 over 52 tokens of 3-7 ids: it may not)


def test_a_new_call_starts_from_its_own_prompt_and_bad_n_is_refused():
    p = NoRepeatNGram(2)
    first = torch.tensor([[1, 2, 1]])
    assert torch.isinf(p(first, torch.zeros(1, 4))[0, 2])  # "1 2" seen: after "1", 2 is banned
    other = torch.tensor([[3, 1]])  # a shorter sequence: another call, whose prompt holds no "1 2"
    assert not torch.isinf(p(other, torch.zeros(1, 4))).any()
    more = torch.tensor([[3, 1, 3], [4, 4, 4]])  # more rows, as long or longer: a new call too (no IndexError)
    got = p(more, torch.zeros(2, 12))
    assert torch.isinf(got).nonzero().tolist() == [[0, 1], [1, 4]]  # row 0: "3 1" seen; row 1: "4 4"
    with pytest.raises(ValueError, match="must be >= 1"):
        NoRepeatNGram(0)


def test_evaluate_jobs_carry_the_setting_into_their_processors(tmp_path):
    """plan_jobs copies a group's ``no_repeat_ngram_size`` into its jobs, and run_job generates with it: its texts
    equal generate's with transformers' own processor of the same n (here the tiny model under a 1-gram ban, which
    changes what it writes), and differ from the texts without the ban."""
    from transformers import LogitsProcessorList

    from data.batches import PromptGroup, left_pad, plan_jobs
    from models import MultiLoRAModel, load_base_model
    from models.tiny import save_test_assets
    from pipeline.stages.decode_engine import DecodeEngine
    from pipeline.stages.evaluate import run_job

    base, dirs = save_test_assets(tmp_path)
    model, tok = load_base_model(base)
    mm = MultiLoRAModel.from_adapters(model, {n: str(d) for n, d in dirs.items()}, router="oracle", tokenizer=tok)
    mm.eval()
    prompts = ["a b c", "hello there"]
    texts = {}
    for n in (1, None):
        group = PromptGroup(prompts, ["a", "b"], max_new_tokens=12, no_repeat_ngram_size=n)
        [job], _ = plan_jobs(tok, [group], batch_size=2, max_prompt_tokens=64)
        assert job["no_repeat_ngram_size"] == n
        texts[n] = run_job(mm, tok, job)["texts"]
    ids, mask = left_pad(job["input_ids"], tok.pad_token_id)
    gen = DecodeEngine("generate", mm)(mm, ids, mask, max_new_tokens=12, pad_token_id=tok.pad_token_id,
                                       eos_token_id=tok.eos_token_id, task_ids=job["task_ids"],
                                       logits_processor=LogitsProcessorList([NoRepeatNGramLogitsProcessor(1)]))
    want = [tok.decode(t, skip_special_tokens=True).strip() for t in gen[:, ids.shape[1]:]]
    assert texts[1] == want and texts[1] != texts[None]
    # the graph decode (evaluate's engine on CUDA; here its CPU form) applies it alike
    assert run_job(mm, tok, {**job, "no_repeat_ngram_size": 1}, DecodeEngine("graph", mm))["texts"] == want
