"""Provenance: enough to tell where a number came from (code version, machine, library versions, date, seed)."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path

PACKAGES = ("torch", "transformers", "peft", "lightning", "hydra-core", "triton", "wandb", "datasets")


def git_sha(cwd=None) -> str:
    """The checkout's HEAD (``+dirty`` when tracked files changed); ``$LORAMUX_GIT_SHA`` wins when set (set it when
    running an exported snapshot, e.g. ``git archive`` on an offline node); else ``unknown``. Every result file
    (metrics.json, paper tables, the kernel benchmarks) takes its sha from here."""
    if os.environ.get("LORAMUX_GIT_SHA"):
        return os.environ["LORAMUX_GIT_SHA"]
    cwd = cwd or Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], check=False, cwd=cwd, capture_output=True, text=True,
                             timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], check=False, cwd=cwd,
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (sha + ("+dirty" if dirty else "")) if sha else "unknown"


def device_name() -> str:
    """``cuda:<GPU name>`` when CUDA is present, else ``cpu:<processor> x<cores>``."""
    import torch  # lazy: provenance is imported by light tools (the report) that need no torch until they run

    if torch.cuda.is_available():
        return f"cuda:{torch.cuda.get_device_name(0)}"
    return f"cpu:{platform.processor() or platform.machine()} x{os.cpu_count()}"


def versions() -> dict[str, str]:
    """Installed versions of the libraries whose behaviour shapes the numbers."""
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


ALLOW_DIRTY_ENV = "LORAMUX_ALLOW_DIRTY"  # set by `reproduce allow_dirty=true`, inherited by its step processes


def code_version_problem(sha: str) -> str | None:
    """Why results made by the code at ``sha`` could not be traced to a commit (None when they can)."""
    if sha == "unknown" or not sha:
        return ("the code version is unknown (not a git checkout and LORAMUX_GIT_SHA unset): set "
                "LORAMUX_GIT_SHA=<the commit this snapshot is>")
    if sha.endswith("+dirty"):
        return f"the checkout has uncommitted changes to tracked files ({sha}): commit them first"
    return None


def provenance(seed) -> dict:
    """The ``provenance`` block of every metrics.json (``allow_dirty``: the run was allowed to start from code that
    is not a clean commit, ``reproduce allow_dirty=true``)."""
    sha = git_sha()
    out = {"git_sha": sha, "device": device_name(), "versions": versions(),
           "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "seed": seed}
    if os.environ.get(ALLOW_DIRTY_ENV) == "1" and code_version_problem(sha):
        out["allow_dirty"] = True
    return out
