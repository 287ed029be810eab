"""The route stage's training step as one CUDA graph (``train_speed.cuda_graph``): what makes it exact on any
device (right-padded rows run without the model's mask; batches padded to a graph's shape change nothing) and,
on a GPU, the replayed step trains the gates as the eager step does."""

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from data.batches import RoutedRowsCollator, pad_to_shape
from models import MultiLoRAModel, load_base_model
from models.tiny import save_test_assets
from pipeline.runtime.step_graph import StepGraphs
from pipeline.runtime.train_speed import cuda_graph_wanted
from pipeline.stages import route as route_stage
from pipeline.stages.route import GraphedStep, RouterTrainModule


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return save_test_assets(tmp_path_factory.mktemp("route_graph"))


def _mm(assets, device="cpu"):
    base, dirs = assets
    model, tok = load_base_model(base, device=device)
    return MultiLoRAModel.from_adapters(model, {n: str(d) for n, d in dirs.items()}, router="meteora", tokenizer=tok)


def _rows(n: int, seed: int = 0) -> list[dict]:
    """Token rows of lengths 5..40 labelled with task i mod 3, every token an LM label (MeteoRA's rows)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        length = int(torch.randint(5, 41, (1,), generator=g))
        ids = torch.randint(0, 256, (length,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": list(ids), "task_id": i % 3})
    return rows


def _loss_and_grads(mm, batch):
    gates = mm.set_trainable("gates")
    mm.zero_grad(set_to_none=True)
    loss, parts = mm.router.training_loss(mm, batch)
    loss.backward()
    return loss.detach(), parts["aux_loss"], [g.grad.clone() for g in gates]


def test_a_batch_padded_to_a_graph_shape_trains_and_counts_as_the_batch(assets):
    """pad_to_shape: rows and columns of padding (pad token, mask 0, labels -100, task 0) add nothing to the LM
    loss, the gates' CE, their gradients or their validation counts."""
    mm = _mm(assets)
    mm.set_router("meteora", top_k=2, aux_loss_coef=50.0)
    batch = RoutedRowsCollator(mm.tokenizer.pad_token_id)(_rows(3))
    padded = pad_to_shape(batch, rows=5, multiple=16, pad_token_id=mm.tokenizer.pad_token_id)
    width = batch["input_ids"].shape[1]
    assert padded["input_ids"].shape == (5, -(-width // 16) * 16) and padded["task_ids"].tolist() == [0, 1, 2, 0, 0]
    assert int(padded["attention_mask"].sum()) == int(batch["attention_mask"].sum())
    assert (padded["labels"][3:] == -100).all() and (padded["input_ids"][3:] == mm.tokenizer.pad_token_id).all()
    (l0, a0, g0), (l1, a1, g1) = _loss_and_grads(mm, batch), _loss_and_grads(mm, padded)
    torch.testing.assert_close(l1, l0, atol=1e-5, rtol=0)
    torch.testing.assert_close(a1, a0, atol=1e-6, rtol=0)
    for a, b in zip(g1, g0, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)
    mm.eval()
    with torch.no_grad():
        counts = []
        for b in (batch, padded):
            mm.router.training_loss(mm, b)
            counts.append([t.tolist() for t in mm.router.gate_hits_by_task()])
    assert counts[0] == counts[1]


def test_pad_to_shape_refuses_what_it_cannot_pad():
    batch = {"input_ids": torch.zeros(4, 7, dtype=torch.long), "attention_mask": torch.ones(4, 7, dtype=torch.long)}
    with pytest.raises(ValueError, match="cannot be padded to 2"):
        pad_to_shape(batch, rows=2, multiple=8, pad_token_id=0)
    with pytest.raises(ValueError, match="neither"):
        pad_to_shape({**batch, "odd": torch.zeros(3)}, rows=4, multiple=8, pad_token_id=0)
    assert pad_to_shape(batch, rows=4, multiple=7, pad_token_id=0)["input_ids"].shape == (4, 7)


def _cfg(accelerator="cpu", devices=1, cuda_graph="auto"):
    return OmegaConf.create({"trainer": {"accelerator": accelerator, "devices": devices},
                             "train_speed": {"cuda_graph": cuda_graph}})


def test_cuda_graph_auto_stays_off_without_a_gpu_and_true_names_the_fix():
    assert cuda_graph_wanted(_cfg(), graphable=True) is False
    assert cuda_graph_wanted(_cfg(cuda_graph=False), graphable=True) is False
    with pytest.raises(ValueError, match="train_speed.cuda_graph=true needs one CUDA GPU"):
        cuda_graph_wanted(_cfg(cuda_graph=True), graphable=True)
    with pytest.raises(ValueError, match="must be auto, true or false"):
        cuda_graph_wanted(_cfg(cuda_graph="sometimes"), graphable=True)


def _fit(mm, rows, graph, steps, schedule="cosine", accelerator="gpu", **train):
    """``steps`` steps of the route module through a real Lightning Trainer (fp32) on ``rows`` in order
    (``train``: train_loras, lora_lr)."""
    torch.manual_seed(0)
    for gate in mm.router.gates.values():
        torch.nn.init.normal_(gate.weight, std=0.02)
    module = RouterTrainModule(mm, lr=2e-2, weight_decay=0.01, schedule=schedule, warmup_steps=1, total_steps=steps,
                               graph=graph, **train)
    if accelerator == "cpu" and graph is not None:  # the CPU has no capturable fused AdamW: the same maths unfused
        module.configure_optimizers = lambda: torch.optim.AdamW(
            module.param_groups(on_device=True), lr=torch.tensor(module.lr), weight_decay=module.weight_decay,
            foreach=False)
    dl = DataLoader(rows, batch_size=4, shuffle=False, collate_fn=RoutedRowsCollator(mm.tokenizer.pad_token_id))
    trainer = L.Trainer(accelerator=accelerator, devices=1, precision="32-true", max_steps=steps, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, inference_mode=False,
                        gradient_clip_val=None if graph is not None else 0.3)
    trainer.fit(module, dl)
    assert trainer.global_step == steps
    return [g.weight.detach().clone() for g in mm.router.gates.values()], module


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("compiled", [False, True], ids=["eager_layers", "compiled_layers"])
def test_gpu_route_step_replayed_as_a_cuda_graph_trains_as_the_eager_step(assets, compiled):
    """Six steps over batches of two length buckets (two graphs, one memory pool), cosine LR, clipping at 0.3:
    the gates end as the eager fit's (fp32), the warm-up steps of each capture undone; Lightning counts every
    replayed step. With compiled layers (train_speed.compile=true under cuda_graph) the captures hold too: no
    recompile inside them, no fallback."""
    from models.compile import compile_layers

    def model():
        mm = _mm(assets, "cuda")  # one model per fit: Lightning's teardown moves a fitted module to the CPU
        mm.set_router("meteora", top_k=2, aux_loss_coef=50.0)
        if compiled:
            compile_layers(mm.model, backend="inductor", dynamic=True)
        return mm

    rows = _rows(24)
    want, _ = _fit(model(), rows, None, 6)
    mm = model()
    graph = GraphedStep(rows=4, bucket=16, pad_token_id=int(mm.tokenizer.pad_token_id), bf16=False, grad_clip=0.3)
    got, module = _fit(mm, rows, graph, 6)
    assert module._graphs.fallback is None, module._graphs.fallback  # the replays held (verified), no eager fallback
    assert module._graphs.capture_retried is None, module._graphs.capture_retried  # compiled layers captured as such
    assert len(module._graphs.shapes) >= 2
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


class StepsRunEagerly(StepGraphs):
    """What a CPU can run in place of the CUDA graphs: per new shape the same warm-up steps and their undoing,
    then every call runs the step eagerly on fresh gradients (as a replay writes them). Everything around the
    graph (padding, the LR tensor, clipping inside the step, Lightning's step count) is the stage's own code."""

    def _check_device(self, device):
        pass  # runs anywhere: nothing is captured

    def __call__(self, batch):
        key = tuple((k, tuple(v.shape)) for k, v in sorted(batch.items()) if torch.is_tensor(v))
        if key not in self._graphs:
            snapshot = self._snapshot()
            for _ in range(self.warmup):
                self.optimizer.zero_grad(set_to_none=True)
                self.step(batch)
            self._restore(snapshot)
            self._graphs[key] = None
        return self._eager_step(batch)


def test_the_graph_path_around_the_step_trains_as_the_eager_path(assets, monkeypatch):
    """On the CPU, with each graph's step run eagerly: six steps over two length buckets with a cosine LR and
    clipping at 0.3 inside the step end with the eager fit's gates; the warm-up steps leave nothing behind."""
    monkeypatch.setattr(route_stage, "StepGraphs", StepsRunEagerly)
    rows = _rows(24)
    mm = _mm(assets)
    mm.set_router("meteora", top_k=2, aux_loss_coef=50.0)
    want, _ = _fit(mm, rows, None, 6, accelerator="cpu")
    mm.set_router("meteora", top_k=2, aux_loss_coef=50.0)
    graph = GraphedStep(rows=4, bucket=16, pad_token_id=int(mm.tokenizer.pad_token_id), bf16=False, grad_clip=0.3)
    got, module = _fit(mm, rows, graph, 6, accelerator="cpu")
    assert len(module._graphs.shapes) >= 2
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_the_graph_path_trains_gates_and_adapters_at_their_own_lrs_as_the_eager_path(assets, monkeypatch):
    """train_loras with its own lora_lr (two AdamW groups, each lr a tensor the graphed step reads, each scaled by
    the cosine schedule from its own base): on the CPU, with each graph's step run eagerly, six steps end with the
    eager fit's gates and adapters; the adapters moved."""
    monkeypatch.setattr(route_stage, "StepGraphs", StepsRunEagerly)
    rows, out = _rows(24), []
    for graphed in (False, True):
        mm = _mm(assets)  # a fresh bank per fit: the fit trains it
        mm.set_router("meteora", top_k=2, aux_loss_coef=50.0)
        start = [p.detach().clone() for sl in mm.bank.slots.values() for p in (sl.A, sl.B)]
        graph = GraphedStep(rows=4, bucket=16, pad_token_id=int(mm.tokenizer.pad_token_id), bf16=False,
                            grad_clip=0.3) if graphed else None
        gates, _ = _fit(mm, rows, graph, 6, accelerator="cpu", train_loras=True, lora_lr=5e-3)
        bank = [p.detach().clone() for sl in mm.bank.slots.values() for p in (sl.A, sl.B)]
        assert any(not torch.equal(a, b) for a, b in zip(bank, start, strict=True))
        out.append(gates + bank)
    for a, b in zip(*out, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


class _Verifier(StepGraphs):
    """StepGraphs' verification on the CPU: the replay is a callable the test gives (a stand-in for the graph)."""

    def __init__(self, step, optimizer, verify=2):
        super().__init__(step, optimizer, "cpu", warmup=0, verify=verify)

    def _check_device(self, device):
        pass  # the replay is the test's callable: nothing is captured


def _toy():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(6))
    opt = torch.optim.AdamW([w], lr=0.1)
    x = {"x": torch.randn(6)}

    def step(batch):
        loss = ((w - batch["x"]) ** 2).sum()
        loss.backward()
        opt.step()
        return loss.detach()

    return w, opt, x, step


def test_a_verified_replay_that_holds_its_step_stands():
    w, opt, x, step = _toy()
    sg = _Verifier(step, opt)
    want_w, _, _, want_step = _toy()
    want_step(x)
    sg._verified_replay("k", lambda: (opt.zero_grad(set_to_none=True), step(x)), x, None)
    assert sg.fallback is None and sg._checked["k"] == 1
    torch.testing.assert_close(w.detach(), want_w.detach(), atol=1e-7, rtol=0)


def test_a_replay_that_differs_from_the_eager_step_falls_back_to_it():
    """A replay that steps on other data (as a graph holding a stale input would): found at its first check; the
    parameters end as the eager step leaves them, and later calls run eagerly."""
    w, opt, x, step = _toy()
    sg = _Verifier(step, opt)
    want_w, want_opt, _, want_step = _toy()
    want_step(x)
    stale = {"x": x["x"] + 1.0}
    sg._verified_replay("k", lambda: (opt.zero_grad(set_to_none=True), step(stale)), x, None)
    assert sg.fallback is not None and "eagerly" in sg.fallback
    torch.testing.assert_close(w.detach(), want_w.detach(), atol=1e-7, rtol=0)
    opt.zero_grad(set_to_none=True)
    want_opt.zero_grad(set_to_none=True)
    sg(x)  # eager from now on
    want_step(x)
    torch.testing.assert_close(w.detach(), want_w.detach(), atol=1e-7, rtol=0)


class _Capture(_Verifier):
    """A capture that raises each of ``errors`` in turn (a recompile inside it, a host read; running out of memory),
    then holds: its "graph" replays the step eagerly on the static batch, so a replay is the eager step."""

    def __init__(self, step, optimizer, errors, on_capture_failure=None):
        super().__init__(step, optimizer)
        self.errors, self.on_capture_failure, self.tries = list(errors), on_capture_failure, 0

    def capture(self, batch):
        self.tries += 1
        if self.tries <= len(self.errors):
            raise self.errors[self.tries - 1]
        static = dict(batch)

        class Replay:
            def replay(_):
                self.optimizer.zero_grad(set_to_none=True)
                self.step(static)

        return Replay(), static, None, None


RECOMPILE = RuntimeError("Detected recompile when torch.compile stance is 'fail_on_recompile'")


def test_a_capture_that_fails_falls_back_to_eager_steps_and_out_of_memory_is_the_callers():
    """A step whose capture fails (e.g. compiled code recompiling inside it) runs eagerly from then on, the step
    taken and ``fallback`` naming why; running out of memory while capturing is raised to the caller."""
    w, opt, x, step = _toy()
    sg = _Capture(step, opt, [RECOMPILE, RECOMPILE])
    want_w, want_opt, _, want_step = _toy()
    for _ in range(2):
        sg(x)
        want_opt.zero_grad(set_to_none=True)
        want_step(x)
    assert "capture of shape" in sg.fallback and "fail_on_recompile" in sg.fallback and not sg.shapes
    torch.testing.assert_close(w.detach(), want_w.detach(), atol=1e-7, rtol=0)
    w, opt, x, step = _toy()
    with pytest.raises(torch.OutOfMemoryError):
        _Capture(step, opt, [torch.OutOfMemoryError("CUDA out of memory")])(x)


def test_compile_under_a_step_graph_is_asked_for_and_auto_compiles_on_one_gpu(assets, monkeypatch):
    """train_speed.compile=true with the step captured compiles the layers (to be captured); auto compiles them
    under a graph on one GPU (the bench's fastest form), stays eager on the CPU, and false keeps them eager."""
    from pipeline.runtime import train_speed
    from pipeline.runtime.train_speed import apply_train_speed

    def cfg(compile_):
        return OmegaConf.create({"trainer": {"accelerator": "cpu", "devices": 1}, "train_speed": {
            "compile": compile_, "backend": "eager", "dynamic": True, "frozen_bf16": False, "cuda_graph": "auto"}})

    mm = _mm(assets)
    auto = apply_train_speed(cfg("auto"), mm.model, cuda_graph=True)
    assert auto["compile"] is False and auto["cuda_graph"] is True and "compiled_layers" not in auto  # the CPU
    asked = apply_train_speed(cfg(True), mm.model, cuda_graph=True)
    assert asked["compile"] is True and asked["compiled_layers"] == mm.model.config.num_hidden_layers
    monkeypatch.setattr(train_speed, "_on_one_gpu", lambda cfg: True)  # the trainer's device: what auto reads
    on_gpu = apply_train_speed(cfg("auto"), _mm(assets).model, cuda_graph=True)
    assert on_gpu["compile"] is True and on_gpu["compiled_layers"] == mm.model.config.num_hidden_layers
    assert apply_train_speed(cfg(False), _mm(assets).model, cuda_graph=True)["compile"] is False


def test_a_failed_capture_is_tried_again_where_the_callback_changed_the_step():
    """``on_capture_failure`` returning True (the route stage's: its layers no longer compiled) gets the capture a
    second try, recorded in ``capture_retried``; the steps then replay, no fallback. Returning False: eager steps."""
    w, opt, x, step = _toy()
    asked = []
    sg = _Capture(step, opt, [RECOMPILE], lambda why: asked.append(why) or True)
    want_w, want_opt, _, want_step = _toy()
    for _ in range(3):
        sg(x)
        want_opt.zero_grad(set_to_none=True)
        want_step(x)
    assert sg.tries == 2 and len(asked) == 1 and "fail_on_recompile" in asked[0]
    assert sg.capture_retried == asked[0] and sg.fallback is None and len(sg.shapes) == 1
    torch.testing.assert_close(w.detach(), want_w.detach(), atol=1e-6, rtol=0)
    w, opt, x, step = _toy()
    sg = _Capture(step, opt, [RECOMPILE], lambda why: False)
    sg(x)
    assert sg.tries == 1 and sg.capture_retried is None and "capture of shape" in sg.fallback


def test_uncompile_layers_undoes_compile_layers(assets):
    from models.compile import compile_layers, decoder_layers, uncompile_layers

    mm = _mm(assets)
    ids = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(0))
    mm.set_routing(task_ids=torch.tensor([0, 1]))
    with torch.no_grad():
        want = mm(input_ids=ids).logits
    n = compile_layers(mm.model, backend="eager")
    assert all(layer._compiled_call_impl is not None for layer in decoder_layers(mm.model))
    assert uncompile_layers(mm.model) == n > 0 and uncompile_layers(mm.model) == 0
    assert all(layer._compiled_call_impl is None for layer in decoder_layers(mm.model))
    with torch.no_grad():
        torch.testing.assert_close(mm(input_ids=ids).logits, want, rtol=0, atol=0)
