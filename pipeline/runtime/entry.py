"""Shared bits of the ``python -m pipeline.<stage>`` entry points: where conf/ is, how user errors end a run.

A user error (unknown task, missing adapter, bad value, a full disk) ends the process with ONE line on stderr
naming the thing and the fix, and exit status 2: no traceback noise. Bugs still show their traceback. Inside a
submitit job (launcher=slurm / submitit_local) the exception is re-raised instead: submitit hands it back to the
sweep, which fails with it. A config error Hydra finds before the stage starts (a typo under strict mode, an
unknown experiment, a sweep value without ``-m``) gets the same one line and status 2 when the entry point runs
its ``@hydra.main`` function through :func:`cli`:

    @hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="finetune")
    def main(cfg):
        with user_errors():
            return finetune(cfg)

    if __name__ == "__main__":
        cli(main)
"""

from __future__ import annotations

import contextlib
import errno
import importlib
import logging
import os
import sys
from pathlib import Path

from pipeline.runtime import settings  # noqa: F401 registers conf/'s resolvers and schemas before Hydra composes

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


@contextlib.contextmanager
def user_errors():
    """Turn a user-facing exception (or a full disk) into ``error: <message>`` + exit status 2."""
    try:
        yield
    except USER_ERRORS as e:
        msg = str(e)
        _report(msg.splitlines()[0] if msg else type(e).__name__, e)
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        _report(disk_full_message(e), e)


def config_error_line(ex: BaseException) -> str:
    """Hydra's multi-line config error as one line (what is wrong + Hydra's own hint how to fix it)."""
    from hydra.errors import MissingConfigException

    lines = [x.strip() for x in str(ex).splitlines() if x.strip()]
    if isinstance(ex, MissingConfigException) and getattr(ex, "options", None):
        return f"{lines[0]}; pick one of: {', '.join(ex.options)}"
    lines = [x for x in lines if not x.startswith(("Config search path", "provider=", "Available options"))]
    cause = ex.__cause__
    if cause is not None and str(cause).strip():
        lines.append(str(cause).strip().splitlines()[0])
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
    module = importlib.import_module(f"pipeline.stages.{Path(sys.modules['__main__'].__file__).stem}")
    return module.main


def cli(main) -> None:
    """Run a ``@hydra.main`` entry point; a config error Hydra raises is one ``error:`` line and exit status 2."""
    from hydra.errors import HydraException

    main = _canonical(main)
    previous = os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra raises instead of printing its own multi-line report
    try:
        main()
    except HydraException as e:
        print(f"error: config: {config_error_line(e)}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    finally:
        if previous is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = previous
