"""Shared bits of the ``python -m pipeline.<stage>`` entry points: where conf/ is, how user errors end a run.

A user error (unknown task, missing adapter, bad value, a full disk) ends the process with ONE line on stderr
naming the thing and the fix, and exit status 2: no traceback noise. Bugs still show their traceback. Inside a
submitit job (launcher=slurm / submitit_local) the exception is re-raised instead: submitit hands it back to the
sweep, which fails with it. A config error Hydra finds before the stage starts (a typo under strict mode, an
unknown experiment, a sweep value without ``-m``, a run dir that cannot be made) gets the same one line and
status 2 when the entry point runs its ``@hydra.main`` function through :func:`cli`:

    @hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="finetune")
    def main(cfg):
        with user_errors(cfg):          # also: refuse a group the stage does not read; clean up a refused run
            return finetune(cfg)

    if __name__ == "__main__":
        cli(main)

Hydra makes the run dir (``.hydra/``, its log) before the stage starts; a run refused before it produced anything
leaves none of it behind (:func:`remove_refused_run`).
"""

from __future__ import annotations

import contextlib
import errno
import importlib
import inspect
import logging
import os
import shutil
import sys
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException, InstantiationException, MissingConfigException

# importing settings registers conf/'s schemas and resolvers before Hydra composes
from pipeline.runtime.settings import refuse_unread_overrides

CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, FloatingPointError, ChildProcessError)

log = logging.getLogger("loramux")


def disk_full_message(e: OSError) -> str:
    """One line for a full disk (ENOSPC / EDQUOT): what was being written and how to get on."""
    where = f" while writing {e.filename}" if e.filename else ""
    return (f"no space left on the device{where} ({e.strerror or 'disk full'}); free space or point LORAMUX_OUTPUTS "
            f"at another disk, then rerun (the previous version of the file is kept)")


def _report(msg: str, e: BaseException):
    print(f"error: {msg}", file=sys.stderr, flush=True)
    if os.environ.get("SUBMITIT_EXECUTOR"):  # a submitit sweep job: the error travels back to the sweep
        raise e
    raise SystemExit(2) from None


#: what a run writes before it does any work: a refused run that holds nothing else leaves nothing behind
RUN_PREAMBLE = {".hydra", "config_tree.txt", "config.yaml", "wandb", "csv"}


def remove_refused_run(cfg) -> None:
    """Delete the run dir of a run refused before it produced anything: it holds only Hydra's ``.hydra/`` and log,
    the saved config and the tracker's files (no metrics.json, no checkpoint, nothing a user made). Empty parent dirs
    inside ``paths.output_root`` go too. Anything else in the dir keeps it (a resumed run's checkpoints, say)."""
    try:
        run_dir = Path(str(cfg.paths.run_dir)).resolve()
        root = Path(str(cfg.paths.output_root)).resolve()
    except Exception:  # noqa: BLE001 no run dir to speak of (an interpolation only Hydra's runtime resolves)
        return
    if not run_dir.is_dir():
        return
    job_log = f"{cfg.stage}.log"
    if any(p.name not in RUN_PREAMBLE and p.name != job_log for p in run_dir.iterdir()):
        return
    shutil.rmtree(run_dir, ignore_errors=True)
    parent = run_dir.parent
    while parent != root and root in parent.parents and not any(parent.iterdir()):
        parent.rmdir()
        parent = parent.parent


def first_line(e: BaseException) -> str:
    """An error's first line (its type's name when it has no message): what a one-line report shows of it."""
    msg = str(e)
    return msg.splitlines()[0] if msg.strip() else type(e).__name__


@contextlib.contextmanager
def user_errors(cfg=None):
    """Turn a user-facing exception (or a full disk) into ``error: <message>`` + exit status 2; with the stage's
    ``cfg``, a run refused before it produced anything leaves no run dir behind (``remove_refused_run``)."""
    try:
        if cfg is not None and HydraConfig.initialized():  # the command line of this process, not reproduce's steps
            refuse_unread_overrides(str(cfg.stage), HydraConfig.get().overrides.task)
        yield
    except BaseException as e:
        cause = e.__cause__ if isinstance(e, InstantiationException) else e  # instantiate wraps a target's error
        if isinstance(cause, USER_ERRORS):
            line = first_line(cause)
        elif isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT):
            line = disk_full_message(cause)
        else:
            raise
        if cfg is not None:
            remove_refused_run(cfg)
        _report(line, cause)


def config_error_line(ex: BaseException) -> str:
    """Hydra's multi-line config error as one line (what is wrong + Hydra's own hint how to fix it)."""
    lines = [x.strip() for x in str(ex).splitlines() if x.strip()]
    if isinstance(ex, MissingConfigException) and getattr(ex, "options", None):
        return f"{lines[0]}; pick one of: {', '.join(ex.options)}"
    lines = [x for x in lines if not x.startswith(("Config search path", "provider=", "Available options"))]
    cause = ex.__cause__
    if cause is not None and str(cause).strip():
        lines.append(str(cause).strip().splitlines()[0])
    if any("not in '" in x for x in lines):  # a typed section (pipeline/runtime/settings.py): appending fails too
        lines = [x for x in lines if not x.startswith("To append to your config")]
    if any("could not be converted to" in x or "Invalid value assigned" in x for x in lines):
        lines.append("give a value of the key's type (`--cfg job` prints every key and its value)")
    text = "; ".join(x.rstrip(".") for x in lines) or type(ex).__name__
    if "Could not override" in text or "not in struct" in text:
        text += " (check the spelling: `--cfg job` prints every key)"
    return text


def _canonical(main):
    """``python -m pipeline.<stage>`` runs ``pipeline/stages/<stage>.py`` as ``__main__``; the entry point of the module
    under its own name is used instead, so a run holds one copy of the stage's classes (the LightningModule a test
    patches, or submitit pickles by reference, is the one that trains)."""
    if getattr(main, "__module__", None) != "__main__":
        return main
    source = Path(inspect.unwrap(main).__code__.co_filename)  # the stage's file (@hydra.main wraps the function)
    return importlib.import_module(f"pipeline.stages.{source.stem}").main


def run_dir_error_line(e: OSError) -> str:
    """The run dir Hydra could not create, what is in the way (a regular file on its path) and the fix."""
    path = Path(str(e.filename or "?"))
    blocker = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)
    why = f"{blocker} is a file, not a directory" if blocker else (e.strerror or type(e).__name__)
    return (f"cannot create the run dir {path}: {why}; point LORAMUX_OUTPUTS (or paths.output_root, hydra.run.dir) "
            f"at a directory you can write")


def cli(main) -> None:
    """Run a ``@hydra.main`` entry point; a config error Hydra raises is one ``error:`` line and exit status 2."""
    main = _canonical(main)
    previous = os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra raises instead of printing its own multi-line report
    try:
        main()
    except HydraException as e:
        print(f"error: config: {config_error_line(e)}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    except (NotADirectoryError, FileExistsError, PermissionError) as e:  # Hydra could not make the run dir
        print(f"error: {run_dir_error_line(e)}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    finally:
        if previous is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = previous
