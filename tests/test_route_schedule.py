"""The route stage's learning-rate schedule (router.train.schedule): MeteoRA's script trains its gates with a
linear warm-up and a cosine decay, clipped gradients; a constant lr is the other choice (DLP-LoRA's router)."""

import itertools

import pytest
import torch

from models import MultiLoRAModel, load_base_model
from models.tiny import save_test_assets
from pipeline.stages.route import RouterTrainModule


@pytest.fixture(scope="module")
def mm(tmp_path_factory):
    base, dirs = save_test_assets(tmp_path_factory.mktemp("route_schedule"))
    model, tok = load_base_model(base)
    return MultiLoRAModel.from_adapters(model, {n: str(d) for n, d in dirs.items()}, router="meteora", tokenizer=tok)


def test_cosine_warms_up_then_decays_to_a_tenth(mm):
    module = RouterTrainModule(mm, lr=1e-3, weight_decay=0.01, schedule="cosine", warmup_steps=4, total_steps=100)
    conf = module.configure_optimizers()
    opt, sched = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    lrs.append(opt.param_groups[0]["lr"])
    assert lrs[0] == pytest.approx(1e-3 / 5) and lrs[:5] == sorted(lrs[:5])  # warm-up: rising to lr
    assert max(lrs) == pytest.approx(1e-3) and lrs[-1] == pytest.approx(1e-4)  # cosine down to 10%
    assert all(a >= b for a, b in itertools.pairwise(lrs[4:]))
    assert opt.param_groups[0]["weight_decay"] == 0.01


def test_constant_is_plain_adamw(mm):
    opt = RouterTrainModule(mm, lr=1e-3).configure_optimizers()
    assert isinstance(opt, torch.optim.AdamW) and opt.param_groups[0]["lr"] == 1e-3


def test_validation_sums_gate_hits_per_projection_over_its_batches(mm):
    """RouterTrainModule.validation_step sums the per-projection counts of every batch as it sums the per-task ones;
    over the whole validation the mean of the gates' accuracies (``projection_accuracies``) is the pooled accuracy
    the per-task counts give, and each layer's value is the mean of its 7 gates'."""
    from pipeline.stages.route import projection_accuracies

    torch.manual_seed(0)
    mm.set_router("meteora", top_k=2)
    module = RouterTrainModule(mm, lr=1e-3)
    module.log = lambda *args, **kwargs: None  # no Trainer here: the logged values are not what is checked
    mm.eval()
    tok = mm.tokenizer
    batches = []
    for prompts, tasks in ((["hello world, this is a test", "abc"], [2, 0]),
                           (["[INST] what is 2+2? [/INST]\n", "x y", "one two three four"], [1, 1, 0])):
        enc = tok(prompts, return_tensors="pt", padding=True)
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        batches.append({**enc, "labels": labels, "task_ids": torch.tensor(tasks)})
    module.on_validation_epoch_start()
    hits, tokens = 0, 0
    for i, batch in enumerate(batches):
        module.validation_step(batch, i)
        h, t = mm.router.gate_hits_by_projection()
        hits, tokens = hits + h, tokens + int(t)
    got_hits, got_tokens = module.val_projection_hits
    assert got_hits.tolist() == hits.tolist() and int(got_tokens) == tokens == sum(
        int(b["attention_mask"].sum()) for b in batches)
    task_hits, task_pairs = module.val_task_hits
    assert module.val_confusion.diagonal().tolist() == task_hits.tolist()  # summed over the batches as the hits are
    assert module.val_confusion.sum(1).tolist() == task_pairs.tolist()
    pooled = float(task_hits.sum() / task_pairs.sum())
    acc = projection_accuracies(module.val_projection_hits, list(mm.router.gates))
    by_projection, by_layer = acc["router_accuracy_by_projection"], acc["router_accuracy_by_layer"]
    assert list(by_projection) == list(mm.router.gates) and list(by_layer) == ["0", "1"]
    assert sum(by_projection.values()) / len(by_projection) == pytest.approx(pooled, abs=1e-5)
    assert sum(by_layer.values()) / 2 == pytest.approx(pooled, abs=1e-5)
    assert 0 < pooled < 1  # fresh gates: neither all right nor all wrong


def test_validation_splits_the_routing_accuracy_into_answer_and_prompt_tokens(mm):
    """Batches that mark their answer tokens (``RoutedRowsCollator(answer_mask=True)``): validation sums the
    answer tokens' per-task hits over its batches (``val_answer_hits``) as it sums all of them, and
    ``span_accuracies`` gives the answers' and the prompts' accuracy, whose token-weighted mean is the pooled
    accuracy; a batch without the mask (a router's training batches) counts no span."""
    from data.batches import RoutedRowsCollator
    from pipeline.stages.route import span_accuracies

    torch.manual_seed(1)
    mm.set_router("meteora", top_k=2)
    module = RouterTrainModule(mm, lr=1e-3)
    module.log = lambda *args, **kwargs: None
    mm.eval()
    g = torch.Generator().manual_seed(4)
    rows = []
    for i in range(7):
        ids = torch.randint(0, 250, (int(torch.randint(6, 20, (1,), generator=g)),), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": list(ids), "task_id": i % 3, "prompt_len": len(ids) - 2 - i % 3})
    collate = RoutedRowsCollator(mm.tokenizer.pad_token_id, answer_mask=True)
    module.on_validation_epoch_start()
    module.validation_step(RoutedRowsCollator(mm.tokenizer.pad_token_id)(rows[:2]), 0)
    assert module.val_answer_hits is None and module.val_task_hits is not None
    module.on_validation_epoch_start()
    want = torch.zeros(3, dtype=torch.long)
    for i, part in enumerate((rows[:3], rows[3:])):
        batch = collate(part)
        assert batch["answer_mask"].sum(1).tolist() == [2 + r["task_id"] for r in part]
        module.validation_step(batch, i)
        want += mm.router.gate_hits_in(batch["answer_mask"])[0]
    hits, pairs = module.val_answer_hits
    gates = len(mm.router.gates)
    assert hits.tolist() == want.tolist()
    assert pairs.tolist() == [gates * sum(2 + r["task_id"] for r in rows if r["task_id"] == t) for t in range(3)]
    acc = span_accuracies(module.val_task_hits, module.val_answer_hits, ["a", "b", "c"])
    all_hits, all_pairs = module.val_task_hits
    n_answers, n_all = int(pairs.sum()), int(all_pairs.sum())
    pooled = (acc["router_accuracy_answers"] * n_answers + acc["router_accuracy_prompts"] * (n_all - n_answers)) / n_all
    assert pooled == pytest.approx(float(all_hits.sum() / all_pairs.sum()), abs=1e-5)
    assert list(acc["router_accuracy_answers_by_task"]) == ["a", "b", "c"]
    assert span_accuracies(module.val_task_hits, None, ["a", "b", "c"]) == {}


def test_gate_ce_mask_takes_the_training_ce_over_the_answer_tokens_alone(mm):
    """``router.train.gate_ce_on_prompt=false``: the training batches carry ``gate_ce_mask`` (the answers, from each
    row's ``prompt_len``) and a training step's gate CE is the mean over every gate of the CE at those tokens alone,
    computed here by hand from the logits each gate made; with the mask all ones it is MeteoRA's CE over every
    token; validation (eval mode) ignores the mask and keeps the CE over every token."""
    import torch.nn.functional as F

    from data.batches import RoutedRowsCollator

    torch.manual_seed(3)
    mm.set_router("meteora", top_k=2)
    g = torch.Generator().manual_seed(8)
    rows = []
    for i in range(4):
        ids = torch.randint(0, 250, (int(torch.randint(8, 16, (1,), generator=g)),), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": list(ids), "task_id": (i + 1) % 3, "prompt_len": len(ids) - 3 - i})
    batch = RoutedRowsCollator(mm.tokenizer.pad_token_id, gate_ce_mask=True)(rows)
    assert "answer_mask" not in batch and batch["gate_ce_mask"].sum(1).tolist() == [3, 4, 5, 6]
    logits = {}
    hooks = [gate.register_forward_hook(lambda m, a, out, k=k: logits.__setitem__(k, out.detach().float()))
             for k, gate in mm.router.gates.items()]
    labels = batch["task_ids"][:, None].expand_as(batch["attention_mask"]).reshape(-1)

    def by_hand(mask):
        inside = mask.reshape(-1) == 1
        return float(torch.stack([F.cross_entropy(x[inside], labels[inside], reduction="sum")
                                  for x in logits.values()]).sum() / (inside.sum() * len(logits)))

    try:
        mm.train()
        _, parts = mm.router.training_loss(mm, batch)
        answers = float(parts["aux_loss"])
        assert answers == pytest.approx(by_hand(batch["gate_ce_mask"]), rel=1e-5)
        _, parts = mm.router.training_loss(mm, {**batch, "gate_ce_mask": batch["attention_mask"]})
        every = float(parts["aux_loss"])
        assert every == pytest.approx(by_hand(batch["attention_mask"]), rel=1e-5)
        assert abs(answers - every) > 1e-4  # the two token sets give two losses: the mask was read
        unmasked = {k: v for k, v in batch.items() if k != "gate_ce_mask"}
        _, parts = mm.router.training_loss(mm, unmasked)
        assert float(parts["aux_loss"]) == pytest.approx(every, rel=1e-5)
        mm.eval()
        _, parts = mm.router.training_loss(mm, batch)
        assert float(parts["aux_loss"]) == pytest.approx(by_hand(batch["attention_mask"]), rel=1e-5)
        assert mm.router._ce_mask is None  # nothing kept past the step
    finally:
        for h in hooks:
            h.remove()
        mm.eval()
