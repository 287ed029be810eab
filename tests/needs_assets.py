"""Skip markers for tests that read the asset cache (`python -m data.fetch`; CI runs `make assets` first)."""

import pytest

from data.assets import bigbench_dir, cache_dir

needs_bigbench = pytest.mark.skipif(
    not (bigbench_dir() / "MANIFEST.json").exists(),
    reason="BIG-bench cache missing: run `python -m data.fetch --bigbench` (CI runs `make assets` first)",
)

needs_tiny_model = pytest.mark.skipif(
    not (cache_dir() / "models" / "tiny-random-llama").is_dir(),
    reason="assets missing: python -m data.fetch --model --bigbench",
)
