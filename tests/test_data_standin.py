"""The generated stand-in task files (data/standin.py): a cache the whole registry loads from, marked everywhere as
not BIG-bench, replaced whole by a real fetch, the same bytes every time."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_data_assets import FAKE, _fake_sdist

from data import assets, standin
from data.composite import build_composite
from data.composite_shots import SHOTS, fixed_shots
from data.task_table import METEORA28, TASKS, bigbench_dirs
from data.tasks import load_split, split_sizes


@pytest.fixture
def standin_cache(tmp_path, monkeypatch):
    root = standin.fill_standin_cache(tmp_path / "standin")
    monkeypatch.setenv("LORAMUX_CACHE", str(root))
    return root


def test_every_registered_dir_is_written_and_checks_clean(standin_cache):
    manifest = json.loads((standin_cache / "bigbench" / "MANIFEST.json").read_text())
    assert manifest["dirs"] == sorted(bigbench_dirs())
    assert all((standin_cache / "bigbench" / rel).is_file() for rel in manifest["files"])
    assert not [p for p in assets.check() if "BIG-bench" in p]  # hashes as MANIFEST says, every dir there


def test_it_says_it_is_a_stand_in(standin_cache):
    assert not assets.real_bigbench()
    source = assets.bigbench_source()
    assert source["source"] == standin.SOURCE and "not BIG-bench" in source["source"]
    from pipeline.runtime.stage import run_provenance

    assert run_provenance(0, ["winowhy"])["data"]["bigbench"]["source"] == standin.SOURCE


def test_every_task_loads_its_kind_in_every_split(standin_cache):
    for name in METEORA28:
        task, sizes = TASKS[name], split_sizes(name)
        assert min(sizes.values()) > 0, name
        rows = load_split(name, "test")
        for row in rows:
            assert row["prompt"].startswith(task.template.split("{inputs}")[0])
            if task.kind == "mcq":
                assert row["answer"] in row["choices"] and len(row["choices"]) >= 2
            else:
                assert row["choices"] == [] and row["answer"]
    assert len({split_sizes(n)["test"] for n in METEORA28}) > 1  # sub-tasks differ in size, as real ones do


def test_the_fixed_composite_examples_are_found_and_composite_n_builds(standin_cache):
    for name in SHOTS:
        assert len(fixed_shots(name, 2)) == 2
    for n in (3, 5, 10):
        ds = build_composite(f"composite{n}", rows=4)
        assert len(ds) == 4 and len(ds[0]["answers"]) == n


def test_same_bytes_every_time_and_rebuilt_only_for_another_version(tmp_path):
    a = standin.fill_standin_cache(tmp_path / "a")
    b = standin.fill_standin_cache(tmp_path / "b")
    ma, mb = ((p / "bigbench" / "MANIFEST.json").read_text() for p in (a, b))
    assert ma == mb
    task = a / "bigbench" / "winowhy" / "task.json"
    stamp = task.stat().st_mtime_ns
    standin.fill_standin_cache(a)  # current: kept
    assert task.stat().st_mtime_ns == stamp
    record = json.loads(ma)
    (a / "bigbench" / "MANIFEST.json").write_text(json.dumps({**record, "standin": standin.VERSION - 1}))
    standin.fill_standin_cache(a)  # an older stand-in: written again
    assert (a / "bigbench" / "MANIFEST.json").read_text() == ma


def test_models_are_linked_not_copied(tmp_path):
    models = tmp_path / "real" / "models"
    (models / "tiny-random-llama").mkdir(parents=True)
    cache = standin.fill_standin_cache(tmp_path / "standin", models=models)
    assert (cache / "models").is_symlink() and (cache / "models" / "tiny-random-llama").is_dir()


def test_a_real_fetch_replaces_the_stand_in_whole(standin_cache, tmp_path):
    sdist = tmp_path / "s.tar.gz"
    digest = _fake_sdist(sdist, FAKE)
    lines: list[str] = []
    assets.fetch_bigbench(["strategyqa"], sdist=sdist, sha256=digest, log=lines.append)
    assert not any("already present" in line for line in lines)
    manifest = json.loads((standin_cache / "bigbench" / "MANIFEST.json").read_text())
    assert "standin" not in manifest and manifest["dirs"] == ["strategyqa"]  # none of the stand-in's dirs kept
    assert not (standin_cache / "bigbench" / "winowhy").exists()
    assert assets.real_bigbench()


def test_needs_bigbench_is_not_met_by_the_stand_in():
    import needs_assets

    if needs_assets.STANDIN is None:
        pytest.skip("this run has BIG-bench's own files (or the stand-in is off): nothing to tell apart")
    assert not needs_assets.REAL_BIGBENCH
    assert Path(assets.cache_dir()) == needs_assets.STANDIN and needs_assets.REAL_CACHE != needs_assets.STANDIN


def test_the_stand_in_beside_a_stand_in_is_itself(tmp_path, monkeypatch):
    """A process started with LORAMUX_CACHE already at a stand-in (a pytest-xdist worker, dry_run.sh run twice)
    gets that cache back, not a stand-in nested inside it."""
    import subprocess
    import sys

    first = standin.standin_beside(tmp_path / "real")
    assert first == tmp_path / "real" / "standin"
    assert standin.standin_beside(first) == first and not (first / "standin").exists()
    assert (first / "bigbench").stat().st_mode & 0o777 == 0o755
    monkeypatch.setenv("LORAMUX_CACHE", str(first))
    out = subprocess.run([sys.executable, "-m", "data.standin"], capture_output=True, text=True, check=True).stdout
    assert out.strip() == str(first) and not (first / "standin").exists()


def test_the_gpu_packer_refuses_the_stand_in(tmp_path):
    """scripts/offline_gpu/pack_bigbench.sh ships the cache's task files to a GPU node: never the stand-in's."""
    import os
    import subprocess

    root = Path(__file__).resolve().parents[1]
    cache = standin.standin_beside(tmp_path / "real")
    packed = root / ".gpubb" / "bb.tgz"
    before = packed.stat().st_mtime_ns if packed.exists() else None
    proc = subprocess.run(["bash", "scripts/offline_gpu/pack_bigbench.sh"], cwd=root, capture_output=True, text=True,
                          env={**os.environ, "LORAMUX_CACHE": str(cache)}, check=False)
    assert proc.returncode == 2 and "stand-in" in proc.stderr and proc.stderr.count("\n") == 1
    assert (packed.stat().st_mtime_ns if packed.exists() else None) == before  # what was packed stays as it was
