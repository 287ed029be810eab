"""Atomic outputs: a reader sees the old file or the new one, never half of one.

The one writer every layer above uses (``pipeline`` re-exports it as ``common.atomic``; it lives in ``models``
because that is the lowest package both ``pipeline`` and ``models`` may import: imports only go down). A file is
written to a temp name in the same directory, flushed and fsynced, then ``os.replace``d over the target (atomic
on POSIX within one filesystem). A directory (a PEFT adapter, a router checkpoint) is written into a sibling temp
dir and swapped in with two renames. A failure at any point (an exception, a full disk) leaves the previous
version in place and removes the temp; a SIGKILL can leave a ``.<name>.*.tmp`` behind, never a half-written target.

    atomic_write_text(run_dir / "metrics.json", json.dumps(m))
    atomic_write_with(run_dir / "router.safetensors", lambda tmp: save_file(tensors, tmp))
    with atomic_dir(adapters / "arithmetic") as tmp:
        peft_model.save_pretrained(tmp)

``replace_dir`` is the swap on its own, for a dir staged elsewhere on the same filesystem (the asset cache stages
downloads under ``<cache>/.tmp``). ``file_digest`` gives the size and sha256 that loaders compare against
(router.json, resume.json).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(directory: Path) -> None:
    """Make a rename durable (POSIX: the directory entry is data of the directory)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _named(e: OSError, path: Path) -> OSError:
    """A full disk names the file that could not be written (the writer's own error often names the temp)."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return OSError(e.errno, e.strerror or os.strerror(e.errno), str(path))
    return e


def file_in_the_way(path) -> Path | None:
    """The regular file (or other non-directory) at ``path`` or at one of its parents, which stops ``path`` from
    being a directory; None when there is none."""
    path = Path(path)
    return next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)


def _make_parent(path: Path) -> None:
    """``mkdir -p`` of ``path``'s directory. An output path that runs through a regular file (``out_dir=`` a file
    the user meant to read, say) is one NotADirectoryError naming the file: mkdir's own FileExistsError names
    neither the file in the way nor the fix, and is no user error to the stage entry points."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocker = file_in_the_way(path.parent)
        if blocker is None:
            raise
        raise NotADirectoryError(f"cannot write {path}: {blocker} is a file, not a directory; point the output "
                                 f"at a directory (or move that file away)") from None


def atomic_write_with(path, write: Callable[[str], object]) -> Path:
    """Let ``write(tmp_path)`` produce the file (``torch.save``, ``safetensors.save_file`` ...), then rename it
    over ``path``; if ``write`` raises (e.g. ``OSError(ENOSPC)``), the previous ``path`` is untouched."""
    path = Path(path)
    _make_parent(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; results are for everyone the umask allows
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError) and _named(e, path) is not e:
            raise _named(e, path) from e
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_bytes(path, data: bytes) -> Path:
    """Write ``data`` to ``path`` via temp file + fsync + rename; the old file survives any failure."""

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    return atomic_write_with(path, write)


def atomic_write_text(path, text: str) -> Path:
    """UTF-8 text version of :func:`atomic_write_bytes`."""
    return atomic_write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_dir(path):
    """Yield a temp dir beside ``path``; on success it replaces ``path`` (old version removed), else vanishes."""
    path = Path(path)
    _make_parent(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700
    try:
        yield tmp
        for f in tmp.rglob("*"):  # the files must be on disk before the rename makes them visible
            if f.is_file():
                with open(f, "rb+") as fh:
                    os.fsync(fh.fileno())
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and _named(e, path) is not e:
            raise _named(e, path) from e
        raise
    replace_dir(tmp, path)


def replace_dir(staged, final) -> Path:
    """Move the fully written dir ``staged`` to ``final`` with two renames: an existing ``final`` is swapped out
    first and removed afterwards. If another process installed ``final`` between the two renames, theirs is kept
    and ``staged`` removed (both are complete)."""
    staged, final = Path(staged), Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    old = None
    if final.exists():
        old = final.parent / f".{final.name}.old-{os.getpid()}"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    try:
        os.replace(staged, final)
    except OSError:
        if not final.exists():
            raise
        shutil.rmtree(staged, ignore_errors=True)
    _fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return final


def file_digest(path) -> dict:
    """``{"bytes": size, "sha256": hex}`` of a file, what loaders check a file against before trusting it."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return {"bytes": os.path.getsize(path), "sha256": h.hexdigest()}
