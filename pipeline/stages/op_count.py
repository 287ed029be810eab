"""How many torch ops one training step of the routed model dispatches: each is a host launch in eager mode and a
kernel in a CUDA graph, so for a small model the count, not the arithmetic, sets the step time.

    python -m pipeline.op_count [--router meteora] [--trainable gates]      (CPU, the 2-layer test model)
    python -m pipeline.op_count --against-peft         (LoRA trained: one adapter and a joint batch beside peft)
    python -m pipeline.op_count --against-peft --inductor     (and the kernels inductor generates for each)

Counts the aten calls of one step (forward, loss, backward, AdamW) under ``torch.profiler``, leaving out views and
other calls that launch nothing, and prints the total, per wrapped projection, and the most frequent ops.
"""

from __future__ import annotations

import tempfile
from collections import Counter

import torch
from torch.profiler import ProfilerActivity, profile

from common.cli_args import ArgumentParser

NO_LAUNCH = {"aten::view", "aten::reshape", "aten::t", "aten::transpose", "aten::as_strided", "aten::expand",
             "aten::unsqueeze", "aten::squeeze", "aten::slice", "aten::select", "aten::permute", "aten::_unsafe_view",
             "aten::detach", "aten::alias", "aten::empty", "aten::empty_strided", "aten::to", "aten::_to_copy",
             "aten::contiguous", "aten::lift_fresh", "aten::resolve_conj", "aten::resolve_neg", "aten::result_type",
             "aten::empty_like", "aten::zeros", "aten::ones", "aten::item", "aten::_local_scalar_dense",
             "aten::narrow", "aten::split", "aten::split_with_sizes", "aten::chunk", "aten::unbind", "aten::flatten",
             "aten::unflatten", "aten::view_as", "aten::_reshape_alias", "aten::numpy_T", "aten::movedim"}


def count_step_ops(router: str = "meteora", trainable: str = "gates", batch: int = 2, seq: int = 16) -> tuple:
    """``(aten calls per step, wrapped projections, Counter of op names)`` for one training step."""
    from models import MultiLoRAModel, load_base_model
    from models.multilora_linear import MultiLoRALinear
    from models.tiny import save_test_assets

    base, dirs = save_test_assets(tempfile.mkdtemp())
    model, tok = load_base_model(base)
    mm = MultiLoRAModel.from_adapters(model, {n: str(d) for n, d in dirs.items()}, tokenizer=tok, router=router)
    params = mm.set_trainable(trainable)
    mm.train()
    opt = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(5, 100, (batch, seq), generator=torch.Generator().manual_seed(0))
    task_ids = torch.arange(batch) % len(dirs)

    def step():
        mm(input_ids=ids, labels=ids, task_ids=task_ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(2):  # lazy state (optimizer, caches) made before the counted step
        step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    ops = Counter({e.key: e.count for e in prof.key_averages() if e.key.startswith("aten::") and e.key not in NO_LAUNCH})
    projections = sum(isinstance(m, MultiLoRALinear) for m in mm.modules())
    return sum(ops.values()), projections, ops


def _launches(event) -> bool:
    """An aten call that launches a kernel itself: not a view or allocation, and nothing it calls launches one."""
    return (event.name.startswith("aten::") and event.name not in NO_LAUNCH
            and not any(_reaches_a_launch(ch) for ch in event.cpu_children))


def _reaches_a_launch(event) -> bool:
    return _launches(event) or any(_reaches_a_launch(ch) for ch in event.cpu_children)


def leaf_launches(events) -> Counter:
    """The profiled aten calls that each launch a kernel: an ``mm`` that allocates its output counts, a ``linear``
    that calls ``mm`` does not (its ``mm`` does)."""
    return Counter(e.name for e in events if _launches(e))


def _stand_in_trainee(variant: str, precision: str, compiled: bool, batch: int, seq: int, backend: str) -> tuple:
    """``(trainee, config, ids)``: ``variant`` as the training benchmark builds it (``train_throughput.build_trainee``)
    on the CPU stand-in of the SmolLM2-135M shape, with a random LoRA (r=8 on all 7 projections) and ``batch`` rows
    of ``seq`` tokens."""
    from omegaconf import OmegaConf

    from pipeline.runtime.entry import CONF_DIR
    from pipeline.stages import train_throughput as tt
    from pipeline.stages.bench import SHAPES, shape_model
    from pipeline.stages.bench_timing import random_adapter

    config, _ = SHAPES["smollm2_135m_tiny"]
    cpu = torch.device("cpu")

    def make_model():
        torch.manual_seed(0)
        return shape_model(config, cpu, torch.float32)

    with tempfile.TemporaryDirectory() as tmp:
        adapter = random_adapter(make_model(), f"{tmp}/adapter", OmegaConf.load(f"{CONF_DIR}/adapter/meteora.yaml"))
        trainee = tt.build_trainee(tt.Setting(variant, precision, compiled, batch), make_model, adapter, batch, 1,
                                   cpu, backend)
    ids = torch.randint(10, config["vocab_size"] - 10, (batch, seq), generator=torch.Generator().manual_seed(0))
    return trainee, config, ids


def training_launches(variant: str, batch: int = 4, seq: int = 16) -> tuple:
    """``(kernel launches of one forward + backward, wrapped projections, Counter)`` for LoRA (r=8 on all 7
    projections) trained on the CPU stand-in of the SmolLM2-135M shape under bf16 autocast, as the training
    benchmark builds it: ``variant`` is ``peft_single`` (peft's own LoRA), ``loramux_single`` (one adapter in the
    bank, uniform route) or ``loramux_joint`` (``batch`` adapters, row i on adapter i: a joint fine-tuning step).
    The optimizer is left out (the same AdamW over the trained tensors)."""
    trainee, config, ids = _stand_in_trainee(variant, "bf16", False, batch, seq, "eager")
    for _ in range(2):
        trainee.step(ids)
    if trainee.multi is not None:
        trainee.multi.set_routing(task_ids=trainee.task_ids(batch))
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = trainee.model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
    ops = leaf_launches(prof.events())
    projections = 7 * config["num_hidden_layers"]
    return sum(ops.values()), projections, ops


def compiled_kernels(variant: str, batch: int = 2, seq: int = 16) -> int:
    """Kernels inductor generates for one training step (forward + backward graphs of the compiled decoder layers,
    fp32, the CPU stand-in of the SmolLM2 shape) of ``variant``, as ``training_launches`` builds it. cuBLAS products
    (extern calls) are not counted: they are the same GEMMs on both sides; what differs is the pointwise work
    around them that inductor could not fuse into them (each a kernel in a CUDA graph on the GPU)."""
    from torch._inductor import metrics

    torch._dynamo.reset()
    trainee, _, ids = _stand_in_trainee(variant, "fp32", True, batch, seq, "inductor")
    metrics.reset()
    trainee.step(ids)
    return int(metrics.generated_kernel_count)


def main(argv=None) -> None:
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--router", default="meteora")
    p.add_argument("--trainable", default="gates")
    p.add_argument("--against-peft", action="store_true",
                   help="LoRA trained: kernel launches of one adapter and of a joint batch beside peft's LoRA")
    p.add_argument("--inductor", action="store_true",
                   help="with --against-peft: also the kernels inductor generates for the compiled layers' step")
    args = p.parse_args(argv)
    if args.against_peft:
        for variant in ("peft_single", "loramux_single", "loramux_joint"):
            total, proj, ops = training_launches(variant)
            print(f"{variant}: {total} kernel launches per forward + backward, {total / proj:.1f} per projection; "
                  + ", ".join(f"{k.removeprefix('aten::')} {v}" for k, v in ops.most_common(6)))
            if args.inductor:
                print(f"{variant}: {compiled_kernels(variant)} kernels generated by inductor for the compiled "
                      "layers' training step (forward + backward graphs; cuBLAS products not counted)")
        return
    total, proj, ops = count_step_ops(args.router, args.trainable)
    print(f"{args.router} ({args.trainable} trained): {total} aten calls per training step, {proj} wrapped "
          f"projections, {total / proj:.1f} per projection")
    print("most frequent: " + ", ".join(f"{k.removeprefix('aten::')} {v}" for k, v in ops.most_common(12)))


if __name__ == "__main__":
    main()
