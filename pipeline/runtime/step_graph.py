"""A whole training step (forward, loss, backward, optimizer) captured once per batch shape in a CUDA graph.

    graphs = StepGraphs(step, optimizer, device)    # step(batch): forward, loss.backward(), optimizer.step()
    out = graphs(batch)                             # first call per shape: warm up, capture, replay; then replay

A step of a small model is host-bound: hundreds of kernel launches, each a few microseconds of Python and driver
work, around a few milliseconds of device work (an H200 trained a 135M model's one-adapter and joint LoRA steps at
batch 64 in half the time as one replayed graph; ``outputs/tables/train_throughput.md``). Replaying a captured graph
costs the host one launch. What a step may do to be captured: read nothing back to the host (no ``.item()``, no
data-dependent shapes), keep its shapes (a batch is copied into the graph's static input, so every batch of a
shape must have it exactly), and use an optimizer that keeps its step count on the device (``capturable=True``
for AdamW; a learning rate that changes must be a tensor the caller fills) and autocast without its cast cache
(``cache_enabled=False``). The routing of the fused core qualifies: its routes are built on the device, from
task ids set before the capture (``prepare``) or carried in the batch as a device tensor.

A batch is one tensor or a dict of tensors (the stages' collated rows); ``step`` may return tensors (the loss and
its parts): the call returns the graph's own output tensors, overwritten by the next replay of that shape, so
whatever must outlive the next step is copied out first.

Capturing needs a few real steps first (on a side stream, where lazy allocations happen). Those steps would
train on the capturing batch several extra times; with ``undo_warmup`` (the default) the trained parameters and
the optimizer's state are put back as they were before them, so the run is the eager run's, step for step.

``verify=N``: the first N replays of each shape are checked against the same step run eagerly from the same
state (on every trained parameter, within 1% of the step's largest update); a replay that differs drops the
graphs and every later step runs eagerly (``fallback`` says why), so a graph that does not hold its step costs
speed, not the run. A capture that fails (a recompile of compiled code, a host read) does the same, unless
``on_capture_failure`` changes the step and says so (the route stage drops its layers' compilation): then the
capture is tried once more (``capture_retried`` says why).

Memory: the graphs of every shape share one memory pool (each replay is self-contained: its inputs live outside
the pool and its outputs are read before the next replay), so they hold about the largest step's activations
and gradients (24-25 GB for the 135M model at batch 64 x 256 tokens) for as long as they live; ``release()``
frees them. ``pool=`` (a ``torch.cuda.graph_pool_handle()``) shares one pool across several ``StepGraphs`` too,
e.g. the settings of a benchmark replayed in turns: their steps never overlap, so they hold the largest
step's temporaries once, not each. What one graph leaves allocated (its gradients, its outputs) is never handed
to another; a graph's temporaries may take memory another graph's capture freed, which that graph rewrites before
it reads (vLLM's decode graphs of every batch size share a pool the same way). So what a step returns must be
read before a graph sharing its pool replays, as before the next replay of its own shape.

A shared pool must outlive the graphs captured into it: CUDA's caching allocator retires a pool when its last
graph is freed, and a later capture into that retired pool fails an internal assertion (``use_count > 0``). So a
shared pool is a ``GraphPool``: a handle kept alive by a one-kernel anchor graph of its own, for as long as the
``GraphPool`` lives; a caller frees its memory by dropping it (and every graph in it), and starts the next phase
on a new one (``StepGraphs.share_pool``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def _shape_key(batch) -> tuple:
    if torch.is_tensor(batch):
        return tuple(batch.shape)
    return tuple((k, tuple(v.shape)) for k, v in sorted(batch.items()) if torch.is_tensor(v))


def _static_copy(batch):
    if torch.is_tensor(batch):
        return batch.clone()
    return {k: (v.clone() if torch.is_tensor(v) else v) for k, v in batch.items()}


def _copy_into(static, batch) -> None:
    if torch.is_tensor(batch):
        static.copy_(batch)
        return
    for k, v in batch.items():
        if torch.is_tensor(v):
            static[k].copy_(v)


class GraphPool:
    """A CUDA graph memory pool for several ``StepGraphs`` that stays usable while its graphs come and go: an anchor
    graph (one fill kernel) holds it, so the capture after every graph in it was released still finds it live."""

    def __init__(self, device):
        self.handle = torch.cuda.graph_pool_handle()
        self._anchor = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self._anchor, pool=self.handle):
            self._anchor_out = torch.zeros(1, device=device)


class StepGraphs:
    """``step`` captured per input shape and replayed; ``prepare(batch)`` (optional) runs before each capture and
    returns what the graph reads and must outlive it (e.g. device task ids)."""

    def __init__(self, step: Callable, optimizer: torch.optim.Optimizer, device, warmup: int = 3,
                 prepare: Callable | None = None, undo_warmup: bool = True, verify: int = 0, pool=None,
                 on_capture_failure: Callable[[str], bool] | None = None):
        self._check_device(torch.device(device))
        self.step, self.optimizer, self.device = step, optimizer, torch.device(device)
        self.warmup, self.prepare, self.undo_warmup, self.verify = warmup, prepare, undo_warmup, int(verify)
        self._graphs: dict = {}  # shape key -> (CUDAGraph, static input, static output, what prepare returned)
        self._checked: dict = {}  # shape key -> replays verified against an eager step
        self._shared_pool = pool  # a pool given by the caller, shared with other StepGraphs (kept on release)
        self._pool = pool
        self.fallback: str | None = None  # why the steps run eagerly now (a replay that differed), else None
        # a failed capture asks this first (with why it failed); True: it changed the step (e.g. its layers no longer
        # compiled), so the capture is tried once more before the steps fall back to eager ones
        self.on_capture_failure = on_capture_failure
        self.capture_retried: str | None = None  # why a capture was tried a second time, else None

    def _check_device(self, device: torch.device) -> None:
        """A CUDA graph needs a CUDA device (a CPU stand-in that runs each step eagerly overrides this)."""
        if device.type != "cuda":
            raise ValueError(f"a CUDA graph needs a CUDA device, got {device}")

    def _snapshot(self):
        """The trained parameters and the optimizer's state, as copies (None where a parameter has no state yet)."""
        params = self._params()
        saved_state = {}
        for p in params:
            st = self.optimizer.state.get(p)
            saved_state[p] = None if not st else {k: (v.clone() if torch.is_tensor(v) else v) for k, v in st.items()}
        return [(p, p.detach().clone()) for p in params], saved_state

    @torch.no_grad()
    def _restore(self, snapshot) -> None:
        """Put parameters and optimizer state back in place (the same tensors: a captured graph reads them)."""
        params, saved_state = snapshot
        for p, v in params:
            p.copy_(v)
        for p, saved in saved_state.items():
            st = self.optimizer.state.get(p)
            if not st:
                continue
            for k, v in st.items():
                if not torch.is_tensor(v):
                    continue
                if saved is None:
                    v.zero_()  # a parameter's first step made its state: back to a fresh optimizer's
                else:
                    v.copy_(saved[k])

    def capture(self, batch):
        """Warm up ``warmup`` steps on a side stream (allocations and lazy inits happen there), then record one
        step without running it. The warm-up steps' updates are undone (``undo_warmup``)."""
        keep = self.prepare(batch) if self.prepare is not None else None
        static = _static_copy(batch)
        snapshot = self._snapshot() if self.undo_warmup else None
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                self.optimizer.zero_grad(set_to_none=True)
                self.step(static)
        torch.cuda.current_stream(self.device).wait_stream(side)
        if snapshot is not None:
            self._restore(snapshot)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        self.optimizer.zero_grad(set_to_none=True)  # backward then writes fresh .grad buffers of the graph's pool
        # compiled code in the step was compiled by the warm-up: a recompile here would run inductor inside the
        # capture (it reads constants back to the host, which a capture refuses), so it fails at once, naming the
        # guard that changed (models.attention says why the attention mask once did)
        with torch.compiler.set_stance("fail_on_recompile"), torch.cuda.graph(graph, pool=self._pool):
            out = self.step(static)
        return graph, static, out, keep

    def __call__(self, batch):
        """One step on ``batch``: captured first if its shape is new, then replayed; the step's outputs. After a
        verified replay that differed from the eager step, or a capture that failed (``fallback``), the step runs
        eagerly."""
        if self.fallback is not None:
            return self._eager_step(batch)
        key = _shape_key(batch)
        if key not in self._graphs:
            try:
                self._graphs[key] = self.capture(batch)
            except torch.OutOfMemoryError:  # not the graph's fault: the caller decides (a bench row, a smaller batch)
                self.release()
                raise
            except RuntimeError as e:  # e.g. a recompile or a host read inside the capture: eager from here on
                why = f"capture of shape {key} failed: {' '.join(str(e).split())[:800]}"  # a recompile's reason too
                self.release()
                if self.capture_retried is None and self.on_capture_failure is not None and self.on_capture_failure(why):
                    self.capture_retried = why
                    return self(batch)
                self.fallback = why
                return self._eager_step(batch)
        graph, static, out, _keep = self._graphs[key]
        _copy_into(static, batch)
        if self._checked.get(key, 0) >= self.verify:
            graph.replay()
            return out
        return self._verified_replay(key, graph.replay, static, out)

    def _params(self) -> list:
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    def _eager_step(self, batch):
        """The step run eagerly, on fresh gradients (as a replay writes them)."""
        self.optimizer.zero_grad(set_to_none=True)
        return self.step(batch)

    def _verified_replay(self, key, replay: Callable[[], None], static, out):
        """The first ``verify`` replays of a shape: the same step run eagerly from the same state first (then
        undone), the replay compared with it on every trained parameter. Within 1% of the step's largest update
        the replay stands; otherwise the graphs are dropped, the replay undone, the eager step taken instead and
        every later step runs eagerly (``fallback`` says why): a wrong graph costs speed, never the run."""
        before = self._snapshot()
        self._eager_step(static)
        eager = [p.detach().clone() for p in self._params()]
        self._restore(before)
        replay()
        start = dict(before[0])
        moved = max((float((e - start[p]).abs().max()) for p, e in zip(self._params(), eager, strict=True)),
                    default=0.0)
        diff = max((float((p.detach() - e).abs().max()) for p, e in zip(self._params(), eager, strict=True)),
                   default=0.0)
        self._checked[key] = self._checked.get(key, 0) + 1
        if diff <= 0.01 * moved + 1e-12:
            return out
        self.fallback = (f"the replayed step of shape {key} moved the trained parameters up to {diff:.3g} away from "
                         f"the eager step's (whose largest update was {moved:.3g}); steps run eagerly from here")
        self._restore(before)
        self.release()
        return self._eager_step(static)

    @property
    def shapes(self) -> list[tuple]:
        """The input shape keys captured so far (a tensor batch: its shape)."""
        return list(self._graphs)

    def share_pool(self, pool) -> None:
        """Capture into ``pool`` (a ``GraphPool``'s handle) from now on: only while no graph of this step lives
        (those stay in the pool they were captured into)."""
        if self._graphs:
            raise RuntimeError("share_pool: release this step's graphs first (they live in the pool they use now)")
        self._shared_pool = self._pool = pool

    def release(self, shape=None) -> None:
        """Free the graph of ``shape`` (every graph when None) and the gradients, which live in its pool."""
        self.optimizer.zero_grad(set_to_none=True)
        if shape is None:
            self._graphs.clear()
        else:
            self._graphs.pop(tuple(shape), None)
        if not self._graphs:
            # an own pool goes with its last graph (the next capture starts a new one); a shared one stays
            self._pool = self._shared_pool
