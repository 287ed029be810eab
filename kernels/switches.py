"""Switches that tests and benchmarks turn on for a while: context managers, never module globals they rewrite.

    with forced_path("bank"):        # every triton forward takes the bank-wide path (benchmarks' A/B, tests)
    with poisoned_buffers():         # buffers the kernels must overwrite start as NaN (tests: a missed element shows)
    with custom_op_only():           # inference goes through the torch.library op too (its dispatch cost, timed)
    with stubbed_launches():         # the direct path returns an empty output instead of launching (host cost alone)

The op reads ``state``; the switches restore the previous value on exit, so they nest and survive exceptions.
``LORAMUX_FORWARD_PATH`` stays the process-wide way to force a path (``kernels.triton_ops.FORWARD_PATH``);
``forced_path`` wins over it for its block.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass


@dataclass
class Switches:
    forward_path: str | None = None  # a forward path forced for a block (None: LORAMUX_FORWARD_PATH, else dispatch)
    poison: bool = False  # fill every buffer the kernels should overwrite with NaN instead of leaving it uninitialised
    direct_launch: bool = True  # False: every triton call goes through the custom op (kernels.bench --overhead)
    launch_stub: bool = False  # the direct path returns an empty output instead of launching (kernels.bench --overhead)


state = Switches()


@contextlib.contextmanager
def _switched(**values):
    old = {k: getattr(state, k) for k in values}
    for k, v in values.items():
        setattr(state, k, v)
    try:
        yield
    finally:
        for k, v in old.items():
            setattr(state, k, v)


def forced_path(path: str):
    """Force the triton forward path ("bank", "token", "grouped"; "auto": the dispatch) inside the block."""
    return _switched(forward_path=path)


def poisoned_buffers():
    """Buffers the kernels must overwrite start as NaN inside the block."""
    return _switched(poison=True)


def custom_op_only():
    """Every triton call goes through the ``loramux::multi_lora`` custom op inside the block (no direct launch)."""
    return _switched(direct_launch=False)


def stubbed_launches():
    """The direct launch path returns an empty output instead of launching inside the block (host cost alone)."""
    return _switched(launch_stub=True)
