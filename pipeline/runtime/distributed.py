"""The few things loramux adds to Lightning's distributed strategies (DDP, FSDP): who is rank 0, and gathering.

Lightning starts the processes (``trainer=ddp``: it re-runs the same ``python -m pipeline.<stage> ...`` command
with ``LOCAL_RANK=1..N-1``; on SLURM each task is one process and ``SLURMEnvironment`` reads its rank), shards the
training data (``DistributedSampler``, or ``DistributedSamplerWrapper`` around a stage's own seeded sampler, so
the global batch order is the single-process order) and all-reduces gradients. Every rank runs the whole stage;
what must happen once per job happens on global rank 0 only:

    if is_global_zero():            # metrics.json, adapters, routers, the wandb run, the saved config
        save(...)
    parts = gather_to_zero(mine)    # rank 0: [rank 0's, rank 1's, ...]; other ranks: None

``global_rank()`` works before the Trainer exists (from the launcher's environment variables, in Lightning's own
order), so a stage can decide at start-up whether this process opens the wandb run. ``shard`` is how a stage's
own seeded sampler (``ResumableSampler``) splits the one-process order across ranks, ``sum_over_ranks`` adds up
per-rank counters (tokens), ``wait_for_all`` is the barrier at the end of every stage. ``fsdp_auto_wrap`` is the
FSDP policy of ``trainer=fsdp``: one FSDP unit per decoder layer of the base model (the frozen weights that make a
big backbone outgrow one GPU), everything else (adapter bank, router) in the root unit. ``full_weights`` gathers
FSDP-sharded parameters for saving (a no-op under DDP or one device).
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch
import torch.distributed as dist
from lightning.pytorch.strategies import FSDPStrategy
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.distributed.fsdp.wrap import lambda_auto_wrap_policy

RANK_VARIABLES = ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")  # Lightning's order


def global_rank() -> int:
    """This process's global rank: the process group's when it is up, else the launcher's environment."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    for key in RANK_VARIABLES:
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return 0


def is_global_zero() -> bool:
    """True in the one process that writes a job's outputs and talks to wandb."""
    return global_rank() == 0


def world_size() -> int:
    """Number of processes in the job (1 without a process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def gather_to_zero(obj):
    """Every rank's ``obj`` as a list on rank 0 (in rank order), None on the other ranks; ``[obj]`` alone."""
    if world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def sum_over_ranks(value: float) -> float:
    """``value`` summed over all ranks (every rank gets the sum); the value itself in one process."""
    if world_size() == 1:
        return value
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item())


class _IsDecoderLayer:
    """True for modules whose class name is listed, or ends with ``DecoderLayer`` (LLaMA, Mistral, Qwen2, ...)."""

    def __init__(self, names=()):
        self.names = frozenset(names or ())

    def __call__(self, module) -> bool:
        name = type(module).__name__
        return name in self.names or (not self.names and name.endswith("DecoderLayer"))


def fsdp_auto_wrap(layer_class_names=None):
    """FSDP ``auto_wrap_policy``: one unit per decoder layer (``layer_class_names`` overrides the match)."""
    return functools.partial(lambda_auto_wrap_policy, lambda_fn=_IsDecoderLayer(layer_class_names))


def full_weights(trainer):
    """Context in which every rank sees full (unsharded) parameters: FSDP's ``summon_full_params``; else nothing."""
    if isinstance(trainer.strategy, FSDPStrategy) and trainer.strategy.model is not None:
        return FSDP.summon_full_params(trainer.strategy.model, writeback=False)
    return contextlib.nullcontext()


def wait_for_all() -> None:
    """Barrier across the job's processes (none without a process group): a rank that goes on to read what
    rank 0 just wrote (the next stage of ``reproduce`` loading an adapter or router) waits here for it."""
    if world_size() > 1:
        dist.barrier()


def shard(order: list) -> list:
    """This rank's share of a global sample order, laid out as torch's ``DistributedSampler`` does: padded (with
    its first samples) to a multiple of the world size, then every N-th sample from position ``rank``. The global
    batch of step k (rank 0's batch k, rank 1's batch k, ...) is then the one-process batch of step k."""
    world = world_size()
    if world == 1:
        return list(order)
    padded = list(order) + list(order)[: (-len(order)) % world]
    return padded[dist.get_rank()::world]


def shard_size(num_samples: int) -> int:
    """``len(shard(range(num_samples)))`` without building it."""
    return -(-int(num_samples) // world_size())


def clip_gradients(module, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
    """Lightning's gradient clipping (``trainer.gradient_clip_val``), except under FSDP: there the norm must be taken
    over every rank's shards, which only the root FSDP module's ``clip_grad_norm_`` does (Lightning's FSDP precision
    plugin refuses ``'norm'`` for that reason). LightningModules call this from ``configure_gradient_clipping``."""
    root = getattr(getattr(getattr(module, "trainer", None), "strategy", None), "model", None)
    if gradient_clip_val and isinstance(root, FSDP) and gradient_clip_algorithm in (None, "norm"):
        root.clip_grad_norm_(float(gradient_clip_val))
        return
    module.clip_gradients(optimizer, gradient_clip_val=gradient_clip_val, gradient_clip_algorithm=gradient_clip_algorithm)
