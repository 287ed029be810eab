"""How many torch ops one training step of the routed model dispatches: each is a host launch in eager mode and a
kernel in a CUDA graph, so for a small model the count, not the arithmetic, sets the step time.

    python -m pipeline.op_count [--router meteora] [--trainable gates]      (CPU, the 2-layer test model)

Counts the aten calls of one step (forward, loss, backward, AdamW) under ``torch.profiler``, leaving out views and
other calls that launch nothing, and prints the total, per wrapped projection, and the most frequent ops.
"""

from __future__ import annotations

import argparse
import tempfile
from collections import Counter

import torch
from torch.profiler import ProfilerActivity, profile

NO_LAUNCH = {"aten::view", "aten::reshape", "aten::t", "aten::transpose", "aten::as_strided", "aten::expand",
             "aten::unsqueeze", "aten::squeeze", "aten::slice", "aten::select", "aten::permute", "aten::_unsafe_view",
             "aten::detach", "aten::alias", "aten::empty", "aten::empty_strided", "aten::to", "aten::_to_copy",
             "aten::contiguous", "aten::lift_fresh", "aten::resolve_conj", "aten::resolve_neg", "aten::result_type",
             "aten::empty_like", "aten::zeros", "aten::ones", "aten::item", "aten::_local_scalar_dense"}


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


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--router", default="meteora")
    p.add_argument("--trainable", default="gates")
    args = p.parse_args(argv)
    total, proj, ops = count_step_ops(args.router, args.trainable)
    print(f"{args.router} ({args.trainable} trained): {total} aten calls per training step, {proj} wrapped "
          f"projections, {total / proj:.1f} per projection")
    print("most frequent: " + ", ".join(f"{k.removeprefix('aten::')} {v}" for k, v in ops.most_common(12)))


if __name__ == "__main__":
    main()
