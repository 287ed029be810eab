"""Shared test setup: nothing waits on a hub, wandb stays offline, GPU tests skip where no CUDA exists; the one
``compose`` fixture that builds a stage's config as ``python -m pipeline.<stage> <overrides>`` would."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
# One intra-op thread per process (set before torch is first imported; the stage, DDP and SLURM processes the tests
# start inherit it): `make test` runs a pytest worker per core and many tests start 2 more processes, so torch's
# default of a thread per core only has threads wait on descheduled siblings (`pipeline.joint_speed --threads`
# says the same of a shared host). Results do not depend on it; set OMP_NUM_THREADS to choose otherwise.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import sys

import needs_assets  # noqa: F401  first: where BIG-bench is absent it points LORAMUX_CACHE at the stand-in
import pytest
import torch

if not torch.cuda.is_available():
    # Triton's interpreter must be chosen before kernels.triton_ops is first imported, by whichever test file is
    # collected first (test files that run Triton on CPU tensors set it too, but only for themselves)
    os.environ.setdefault("TRITON_INTERPRET", "1")

# absl (imported by rouge-score) builds a logging handler on the sys.stderr of its import time, which under pytest is
# a capture file, and closes that stream whenever logging is reconfigured (Hydra does so when a test runs a stage's
# CLI in-process): pytest's own capture then fails with "I/O operation on closed file". Point it at the real stderr,
# which absl never closes.
try:
    from absl import logging as absl_logging

    absl_logging.get_absl_handler().python_handler.setStream(sys.__stderr__)
except ImportError:
    pass


@pytest.fixture(scope="session")
def compose():
    """``compose(stage, overrides=(), run_dir=None, hydra=False)`` -> ``conf/<stage>.yaml`` with ``overrides``, composed by
    ``pipeline.runtime.compose`` (the pipeline's own helper); ``run_dir`` sets ``paths.run_dir``; ``hydra=True`` keeps
    the ``hydra`` node. A Hydra left initialised by an in-process CLI run is cleared first."""
    from hydra.core.global_hydra import GlobalHydra

    from pipeline.runtime.compose import compose as compose_config

    def _compose(stage: str, overrides=(), run_dir=None, hydra: bool = False):
        GlobalHydra.instance().clear()
        return compose_config(stage, overrides, run_dir=run_dir, return_hydra_config=hydra)

    return _compose


@pytest.fixture
def triton_ops():
    """``kernels.triton_ops`` with every buffer the kernels should overwrite filled with NaN first, for the whole
    test (``kernels.switches.poisoned_buffers``: a kernel that leaves an element unwritten shows as NaN)."""
    from kernels import switches, triton_ops

    with switches.poisoned_buffers():
        yield triton_ops


def pytest_configure(config):
    """pytest-xdist (>= 3.6) re-sorts ``--dist loadfile`` work by test count unless told not to, which would start
    the few-test, minutes-long files last: keep the order ``pytest_collection_modifyitems`` gives."""
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config, items):
    """GPU tests skip where no CUDA GPU is visible. Test files with the most ``slow`` / ``slurm`` tests run first,
    each file's own order kept: ``make test`` hands whole files to its workers in this order (pytest-xdist,
    ``--dist loadfile``), so the long files start early instead of one worker running the last of them alone."""
    weight: dict[str, int] = {}
    for item in items:
        heavy = item.get_closest_marker("slow") is not None or item.get_closest_marker("slurm") is not None
        weight[item.path] = weight.get(item.path, 0) + int(heavy)
    items.sort(key=lambda item: -weight[item.path])  # stable: files stay whole, in their own order
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA GPU")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


def pytest_terminal_summary(terminalreporter):
    """Where assets were missing, say at the end that the stand-in task files were read, how many tests did not run
    for it, and how to get them: a run with the BIG-bench cache empty (its sdist no longer on the index) must not
    pass for a whole run unnoticed."""
    from needs_assets import MISSING_ASSET, STANDIN

    if STANDIN is not None:
        terminalreporter.write_sep("!", "BIG-bench absent: tests over tasks ran on generated stand-in task files "
                                   f"({STANDIN}, data/standin.py)", yellow=True)
    skipped = [r for r in terminalreporter.stats.get("skipped", [])
               if isinstance(r.longrepr, tuple) and MISSING_ASSET in str(r.longrepr[-1])]
    if skipped:
        terminalreporter.write_sep("!", f"{len(skipped)} tests did not run: assets missing", yellow=True)
        reasons = [str(r.longrepr[-1]).removeprefix("Skipped: ") for r in skipped]
        for reason in sorted(set(reasons)):
            terminalreporter.write_line(f"  {reasons.count(reason)} x {reason}")
