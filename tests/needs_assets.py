"""Skip markers for tests that read the asset cache (`python -m data.fetch`; CI runs `make assets` first).

`make test` fetches with `--skip-unavailable`: an asset its source no longer offers (the bigbench==1.0.0 sdist
left PyPI's index in 2026-12) leaves its part of the cache empty, and these markers skip what reads it; the test
summary (tests/conftest.py) counts those skips under one banner, so a run that could not read BIG-bench says so.
"""

import pytest

from data.assets import bigbench_dir, cache_dir

MISSING_ASSET = "cache missing"  # in every reason below: the summary finds these skips by it

needs_bigbench = pytest.mark.skipif(
    not (bigbench_dir() / "MANIFEST.json").exists(),
    reason="BIG-bench cache missing: run `python -m data.fetch --bigbench` (or --bigbench-sdist PATH / "
           "--bigbench-dir DIR where the index lacks the sdist)",
)

needs_tiny_model = pytest.mark.skipif(
    not (cache_dir() / "models" / "tiny-random-llama").is_dir(),
    reason="tiny model cache missing: run `python -m data.fetch --model`",
)
