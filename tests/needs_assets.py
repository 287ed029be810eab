"""Skip markers for tests that read the asset cache (`python -m data.fetch`; CI runs `make assets` first), and the
stand-in task files that let the pipeline's plumbing tests run where BIG-bench is absent.

`make test` fetches with `--skip-unavailable`: an asset its source no longer offers (the bigbench==1.0.0 sdist
left PyPI's index in 2026-12) leaves its part of the cache empty. Then, on import (tests/conftest.py imports this
first, so every worker and every process a test starts inherits it), `LORAMUX_CACHE` is pointed at
`<cache>/standin/`: generated task files in BIG-bench's layout (data/standin.py) beside a link to the real models.
Two markers tell the tests apart:

- ``needs_task_files``: the test runs stages over tasks and needs *some* task files (the real ones, else the
  stand-in): smoke reproduce, DDP, SLURM, sweeps, resume. Its numbers are never asserted against BIG-bench.
- ``needs_bigbench``: the test reads BIG-bench's own content (MeteoRA's golden prompts, row counts, the committed
  route record's rows); it skips unless the real files are there.

`LORAMUX_STANDIN=0` turns the stand-in off (those tests then skip too). The test summary (tests/conftest.py)
counts every asset skip under one banner, so a run that could not read BIG-bench says so.
"""

import os
from pathlib import Path

import pytest

from data.assets import cache_dir, real_bigbench

MISSING_ASSET = "cache missing"  # in every reason below: the summary finds these skips by it

# the cache this run started with (LORAMUX_CACHE, else ~/.cache/loramux): pytest-xdist's workers inherit the
# switched LORAMUX_CACHE, so the first process leaves the real one in LORAMUX_TEST_REAL_CACHE
REAL_CACHE = Path(os.environ.get("LORAMUX_TEST_REAL_CACHE") or cache_dir())
REAL_BIGBENCH = real_bigbench(REAL_CACHE)
STANDIN = None
if not REAL_BIGBENCH and os.environ.get("LORAMUX_STANDIN", "1") != "0":
    from data.standin import standin_beside

    STANDIN = standin_beside(REAL_CACHE)
    os.environ["LORAMUX_TEST_REAL_CACHE"] = str(REAL_CACHE)
    os.environ["LORAMUX_CACHE"] = str(STANDIN)

_FETCH = ("run `python -m data.fetch --bigbench` (or --bigbench-sdist PATH / --bigbench-dir DIR where the index "
          "lacks the sdist)")

needs_bigbench = pytest.mark.skipif(not REAL_BIGBENCH, reason=f"BIG-bench cache missing: {_FETCH}")

needs_task_files = pytest.mark.skipif(
    not (REAL_BIGBENCH or STANDIN), reason=f"BIG-bench cache missing (stand-in off: LORAMUX_STANDIN=0): {_FETCH}")

needs_tiny_model = pytest.mark.skipif(
    not (cache_dir() / "models" / "tiny-random-llama").is_dir(),
    reason="tiny model cache missing: run `python -m data.fetch --model`",
)
