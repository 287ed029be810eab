"""A whole training step (forward, loss, backward, optimizer) captured once per batch shape in a CUDA graph.

    graphs = StepGraphs(step, optimizer, device)    # step(ids): forward, loss.backward(), optimizer.step()
    graphs(ids)                                     # first call per shape: warm up, capture, replay; then replay

A step of a small model is host-bound: hundreds of kernel launches, each a few microseconds of Python and driver
work, around a few milliseconds of device work (an H200 trained a 135M model's one-adapter and joint LoRA steps at
batch 64 in half the time as one replayed graph; ``outputs/tables/train_throughput.md``). Replaying a captured graph
costs the host one launch. What a step may do to be captured: read nothing back to the host (no ``.item()``, no
data-dependent shapes), keep its shapes (a batch is copied into the graph's static input, so every batch of a
shape must have it exactly), and use an optimizer that keeps its step count on the device (``capturable=True``
for AdamW) and autocast without its cast cache (``cache_enabled=False``). The routing of the fused core qualifies:
its routes are built on the device, from task ids set before the capture (``prepare``).

Memory: a graph keeps the step's activations and gradients in its own pool (24-25 GB for the 135M model at batch
64 x 256 tokens), for as long as it lives; ``release(shape)`` frees one.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


class StepGraphs:
    """``step`` captured per input shape and replayed; ``prepare(ids)`` (optional) runs before each capture and
    returns what the graph reads and must outlive it (e.g. device task ids)."""

    def __init__(self, step: Callable[[torch.Tensor], None], optimizer: torch.optim.Optimizer, device,
                 warmup: int = 3, prepare: Callable[[torch.Tensor], object] | None = None):
        if torch.device(device).type != "cuda":
            raise ValueError(f"a CUDA graph needs a CUDA device, got {device}")
        self.step, self.optimizer, self.device = step, optimizer, torch.device(device)
        self.warmup, self.prepare = warmup, prepare
        self._graphs: dict = {}  # shape -> (CUDAGraph, static input, what prepare returned)

    def capture(self, ids: torch.Tensor):
        """Warm up ``warmup`` steps on a side stream (allocations and lazy inits happen there), then record one
        step without running it. The warm-up steps do update the parameters, as any step does."""
        keep = self.prepare(ids) if self.prepare is not None else None
        static = ids.clone()
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                self.optimizer.zero_grad(set_to_none=True)
                self.step(static)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        self.optimizer.zero_grad(set_to_none=True)  # backward then writes fresh .grad buffers of the graph's pool
        with torch.cuda.graph(graph):
            self.step(static)
        return graph, static, keep

    def __call__(self, ids: torch.Tensor) -> None:
        """One step on ``ids``: captured first if its shape is new, then replayed."""
        shape = tuple(ids.shape)
        if shape not in self._graphs:
            self._graphs[shape] = self.capture(ids)
        graph, static, _keep = self._graphs[shape]
        static.copy_(ids)
        graph.replay()

    @property
    def shapes(self) -> list[tuple]:
        """The input shapes captured so far."""
        return list(self._graphs)

    def release(self, shape=None) -> None:
        """Free the graph of ``shape`` (every graph when None) and the gradients, which live in its pool."""
        self.optimizer.zero_grad(set_to_none=True)
        if shape is None:
            self._graphs.clear()
        else:
            self._graphs.pop(tuple(shape), None)
