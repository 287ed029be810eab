"""Command-line parsing for the repository's plain (non-Hydra) tools, by the rule every entry point keeps: bad input
is ONE line on stderr that names the fix, ``error: <what is wrong>; usage: <the usage on one line>``, and exit
status 2, with nothing written. (The Hydra stages keep it through ``pipeline.runtime.entry``.)

argparse itself prints its usage block and then the error, three to five lines; ``ArgumentParser`` here folds both
into the one line. ``user_error`` is the same line for what a tool finds wrong after parsing.

    from common.cli_args import ArgumentParser, user_error

    ap = ArgumentParser(prog="python -m pipeline.report.gate_probe", description="...")
    ...
    except ValueError as e:
        return user_error(e)
"""

from __future__ import annotations

import argparse
import sys


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose usage errors (a missing argument, an unknown option, a bad choice or type)
    are one line, ``error: <argparse's message>; usage: ...``, and exit status 2."""

    def error(self, message: str):
        usage = " ".join(self.format_usage().split())  # argparse wraps a long usage over several lines
        self.exit(2, f"error: {message}; {usage}\n")


def user_error(message) -> int:
    """Print ``error: <message>`` (one line) to stderr; return 2, the status a tool's ``main`` then exits with."""
    print(f"error: {' '.join(str(message).split())}", file=sys.stderr)
    return 2
