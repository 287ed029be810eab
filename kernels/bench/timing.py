"""How the op's GPU benchmarks time a call and say where they ran (shared by ``kernel_bench`` and ``epilogue``).

``time_ms``: the median ms of one call, over several rotated input sets replayed as one CUDA graph (or eagerly),
by ``triton.testing.do_bench``. ``provenance``: the device, versions, git sha, date, method and duration a result
file records.
"""

from __future__ import annotations

import datetime
import time

import torch
import triton

from common.provenance import git_sha


def time_ms(make_fn, n_sets, graph, stream):
    """Median ms of one call; ``make_fn(i)`` returns the callable for input set i (setup runs on ``stream``)."""
    if not graph:  # eager: do_bench's events are recorded on the current stream, so run everything there
        stream = torch.cuda.current_stream()
    with torch.cuda.stream(stream):
        fns = [make_fn(i) for i in range(n_sets)]

        def run_all():
            for f in fns:
                f()

        run_all()
        run_all()
    torch.cuda.synchronize()
    if graph:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, stream=stream):
            run_all()
        fn = g.replay
    else:

        def fn():
            with torch.cuda.stream(stream):
                run_all()

    ms = triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median")
    return ms / n_sets


def provenance(t0, method):
    """Where and with what a result file was measured (device, versions, git sha, date, method, duration)."""
    return {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "git_sha": git_sha(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "method": method, "seconds": round(time.time() - t0, 1)}  # fmt: skip
