"""Shared bits of the ``python -m pipeline.<stage>`` entry points: where conf/ is, how user errors end a run.

A user error (unknown task, missing adapter, bad value) ends the process with ONE line on stderr naming the
thing and the fix, and exit status 2: no traceback noise. Bugs still show their traceback. Inside a submitit job
(launcher=slurm / submitit_local) the exception is re-raised instead: submitit hands it back to the sweep, which
fails with it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from pathlib import Path

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, FloatingPointError, ChildProcessError)

log = logging.getLogger("loramux")


@contextlib.contextmanager
def user_errors():
    """Turn a user-facing exception into ``error: <message>`` + exit status 2."""
    try:
        yield
    except USER_ERRORS as e:
        msg = str(e)
        print(f"error: {msg.splitlines()[0] if msg else type(e).__name__}", file=sys.stderr, flush=True)
        if os.environ.get("SUBMITIT_EXECUTOR"):  # a submitit sweep job: the error travels back to the sweep
            raise
        raise SystemExit(2) from None
