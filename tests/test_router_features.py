"""The DLP router's features (models/routing/features.py): the span it routes is the span it trains on, padding
side and segments change nothing, and on real BIG-bench prompts the pooled prefix separates tasks the mean of
input embeddings confuses."""

from __future__ import annotations

import collections

import pytest
import torch
from needs_assets import needs_bigbench

from data.assets import cache_dir
from models.routing.features import check_windows, segment_positions, sequence_features, span_features


def test_features_are_the_span_mean_and_prefix_window_means_whatever_the_padding():
    torch.manual_seed(0)
    e = torch.randn(1, 7, 5)
    feats = sequence_features(e, None, span=4, windows=(2, 3))
    torch.testing.assert_close(feats[0, :5], e[0, :4].mean(0))   # the span: the first 4 tokens only
    torch.testing.assert_close(feats[0, 5:10], e[0, :2].mean(0))  # window [0, 2)
    torch.testing.assert_close(feats[0, 10:], e[0, 2])            # window [2, 3)
    left = torch.cat([torch.zeros(1, 3, 5), e], 1)                # the same tokens, left padded (generation)
    right = torch.cat([e, torch.zeros(1, 3, 5)], 1)               # right padded (router training)
    pad_left = torch.tensor([[0] * 3 + [1] * 7])
    for x, m in ((left, pad_left), (right, pad_left.flip(1))):
        torch.testing.assert_close(sequence_features(x, m, 4, (2, 3)), feats)
    short = sequence_features(e[:, :1], None, 4, (2, 3))         # a unit shorter than a window: zeros there
    assert torch.equal(short[0, 10:], torch.zeros(5))
    torch.testing.assert_close(sequence_features(e, None), e.mean(1))  # no span, no windows: the plain mean
    with pytest.raises(ValueError, match=r"increasing positive"):
        check_windows([8, 4])


def test_segments_get_the_features_of_each_segment_alone():
    torch.manual_seed(1)
    e = torch.randn(9, 4)
    seg = torch.tensor([-1, 0, 0, 0, 1, 1, -1, 2, 2])
    got = span_features(e, seg, segment_positions(seg), 3, span=2, windows=(1,))
    for s in range(3):
        alone = e[seg == s][None]
        torch.testing.assert_close(got[s], sequence_features(alone, None, 2, (1,))[0])


def _mlp(d: int, classes: int, hidden: int = 256) -> torch.nn.Module:
    """The DLP router's classifier (models/router_dlp.py): LayerNorm, then 3 GELU layers and the output."""
    layers = [torch.nn.LayerNorm(d)]
    width = d
    for _ in range(3):
        layers += [torch.nn.Linear(width, hidden), torch.nn.GELU()]
        width = hidden
    return torch.nn.Sequential(*layers, torch.nn.Linear(width, classes))


@pytest.mark.slow
@needs_bigbench
def test_pooled_prefix_separates_what_the_mean_confuses_on_real_prompts():
    """26 DLP tasks, SmolLM2-135M's input embeddings, 64 training prompts per task (their first 256 tokens, as the
    route stage trains), 300 steps of the same MLP: the mean alone sends contextual_parametric_knowledge_conflicts
    prompts to disfl_qa (both a Wikipedia passage with a question); the pooled prefix windows do not."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from data.tasks import load_split, select

    real = cache_dir() / "models" / "SmolLM2-135M-Instruct"
    if not (real / "config.json").is_file():
        pytest.skip(f"{real} not built yet (python -m data.fetch --model)")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # thousands of tiny ops: threads only contend on a shared CPU
    try:
        tok = AutoTokenizer.from_pretrained(real)
        emb = AutoModelForCausalLM.from_pretrained(real).get_input_embeddings().weight.detach()
        tasks = list(select("dlp26"))

        def rows(split, n):
            out = []
            for label, task in enumerate(tasks):
                prompts = list(load_split(task, split, **{f"max_{split}": n})["prompt"])
                out += [(ids, label) for ids in tok(prompts, add_special_tokens=False)["input_ids"]]
            return out
        train, test = rows("train", 64), rows("test", 32)
        ctx, disfl = tasks.index("contextual_parametric_knowledge_conflicts"), tasks.index("disfl_qa")
        result = {}
        for name, windows in (("mean", ()), ("pooled", (4, 8, 16, 32))):
            def feats(data, windows=windows):
                return torch.cat([sequence_features(emb[torch.tensor(ids[:256])][None], None, 256, windows)
                                  for ids, _ in data])
            x, y = feats(train), torch.tensor([label for _, label in train])
            t, ty = feats(test), torch.tensor([label for _, label in test])
            torch.manual_seed(0)
            mlp, g = _mlp(x.shape[1], len(tasks)), torch.Generator().manual_seed(0)
            opt = torch.optim.AdamW(mlp.parameters(), lr=1e-3, weight_decay=0.01)
            for _ in range(300):
                i = torch.randint(0, len(x), (32,), generator=g)
                loss = torch.nn.functional.cross_entropy(mlp(x[i]), y[i])
                opt.zero_grad()
                loss.backward()
                opt.step()
            with torch.no_grad():
                pred = mlp(t).argmax(-1)
            pairs = collections.Counter((int(a), int(b)) for a, b in zip(ty, pred))
            result[name] = ((pred == ty).float().mean().item(), pairs[(ctx, disfl)] + pairs[(disfl, ctx)])
    finally:
        torch.set_num_threads(threads)
    (mean_acc, mean_mixed), (pooled_acc, pooled_mixed) = result["mean"], result["pooled"]
    assert mean_mixed >= 2 and mean_acc < 0.99, result          # the mean confuses the two passage-question tasks
    assert pooled_mixed == 0 and pooled_acc >= 0.995, result    # the prefix windows separate them
