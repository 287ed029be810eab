"""How a stage's training step runs on a GPU: regional torch.compile and frozen weights stored in bf16.

``python -m pipeline.bench experiment=train_throughput`` measured both on an H200 (outputs/tables/train_throughput.md):
compiled decoder layers make a joint / gates training step 2.6-2.7x faster than eager, so the training stages
(finetune, route) turn them on by default where they apply:

    train_speed.compile      auto: compile every decoder layer (``models.compile``) when the trainer runs on one
                             CUDA GPU (multi-device strategies stay eager); true / false force it
    train_speed.backend      the torch.compile backend (inductor; eager in CPU tests)
    train_speed.dynamic      compile with dynamic shapes from the first batch. A stage's batches are padded to
                             their longest row, so lengths vary: with static shapes dynamo compiles the first length,
                             then recompiles for any length at the second (about 50 s each for the gates' step on an
                             H200, once for training and once for the eval-mode validation graph)
    train_speed.frozen_bf16  auto: with a bf16 trainer precision on CUDA, store the frozen weights in bf16
                             (``models.precision``); trained parameters and AdamW state stay fp32; true / false
    train_speed.cuda_graph   auto: capture the whole training step (forward, loss, backward, AdamW) in a CUDA graph
                             per batch shape and replay it (``pipeline.runtime.step_graph``) where the stage can
                             (route, on one CUDA GPU); true / false. Under it the compiled layers (``compile``
                             auto or true) are captured: the bench's fastest form of every variant (the gates at the
                             route stage's 8 rows: 1.7x the eager captured step, e9f06c9,
                             outputs/tables/train_throughput_compiled_graph.md; the route stage's GPU test of it
                             passed at db59aab). Compiled layers whose capture fails (a recompile inside it) run
                             eagerly and are captured again; a capture that still fails falls back to eager steps,
                             as a replay that differs does.
    train_speed.graph_bucket rows are padded to a multiple of this many tokens (and every batch to the batch size)
                             under ``cuda_graph``: a graph per length bucket, not per length

What was applied is returned and recorded in the run's metrics.json.
"""

from __future__ import annotations

import logging

import torch
from omegaconf import DictConfig

from models.compile import compile_layers
from models.precision import store_frozen

log = logging.getLogger(__name__)


def _on_one_gpu(cfg: DictConfig) -> bool:
    t = cfg.trainer
    accel = str(t.get("accelerator", "cpu"))
    one = int(t.get("num_nodes", 1) or 1) == 1 and str(t.get("devices", 1)) in ("1", "auto")
    return torch.cuda.is_available() and accel in ("gpu", "cuda", "auto") and one


def _decide(value, auto: bool, key: str) -> bool:
    if value in (True, False):
        return bool(value)
    if str(value) != "auto":
        raise ValueError(f"train_speed.{key}={value!r} must be auto, true or false")
    return auto


def bf16_trainer(cfg: DictConfig) -> bool:
    """Whether ``cfg.trainer`` trains under bf16 precision (``bf16-mixed`` / ``bf16-true``)."""
    return str(cfg.trainer.get("precision", "32")).startswith("bf16")


def cuda_graph_wanted(cfg: DictConfig, graphable: bool) -> bool:
    """Whether the stage captures its training step (``train_speed.cuda_graph``): auto = where the stage can
    (``graphable``) on one CUDA GPU; true where it cannot is a user error naming the fix."""
    s = cfg.get("train_speed") or {}
    gpu = _on_one_gpu(cfg)
    wanted = _decide(s.get("cuda_graph", "auto"), gpu and graphable, "cuda_graph")
    if wanted and not (gpu and graphable):
        raise ValueError("train_speed.cuda_graph=true needs one CUDA GPU (trainer=gpu, one device) and a stage "
                         "that captures its step (route with router=meteora); set train_speed.cuda_graph=auto")
    return wanted


def apply_train_speed(cfg: DictConfig, model, cuda_graph: bool = False) -> dict:
    """Apply ``cfg.train_speed`` to ``model`` (after its trainable parameters are set); return what was applied.
    ``cuda_graph``: the stage replays its step as a CUDA graph (``cuda_graph_wanted``): compiled layers compile in
    the capture's warm-up steps and are captured."""
    s = cfg.get("train_speed") or {}
    gpu = _on_one_gpu(cfg)
    bf16 = bf16_trainer(cfg)
    frozen = _decide(s.get("frozen_bf16", "auto"), gpu and bf16, "frozen_bf16")
    compiled = _decide(s.get("compile", "auto"), gpu, "compile")
    applied = {"compile": compiled, "frozen_bf16": frozen, "cuda_graph": cuda_graph}
    if frozen:
        applied["frozen_cast"] = store_frozen(model, torch.bfloat16)
    if compiled:
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        applied["compiled_layers"] = compile_layers(model, backend=str(s.get("backend", "inductor")),
                                                   dynamic=bool(s.get("dynamic", True)))
    log.info("train speed: %s", applied)
    return applied
