"""common.cli_args: the plain (non-Hydra) tools' bad input is one ``error: ...`` line and exit 2, argparse's own
usage errors included (argparse prints its usage block, then the error, on separate lines)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from common.cli_args import ArgumentParser, user_error

ROOT = Path(__file__).resolve().parent.parent


def test_usage_errors_are_one_line_with_the_usage_folded_into_it(capsys):
    ap = ArgumentParser(prog="python -m some.tool")
    ap.add_argument("record")
    for name in ("--a-rather-long-option-name", "--another-rather-long-option", "--and-a-third-one-to-wrap"):
        ap.add_argument(name, type=int, default=1)
    assert len(ap.format_usage().splitlines()) > 1, "a usage argparse wraps is what the test folds"
    bad_int = "argument --a-rather-long-option-name: invalid int value: 'two'"
    for argv, message in (([], "the following arguments are required: record"),
                          (["x", "--a-rather-long-option-name", "two"], bad_int),
                          (["x", "--typo"], "unrecognized arguments: --typo")):
        with pytest.raises(SystemExit) as stop:
            ap.parse_args(argv)
        err = capsys.readouterr().err
        assert stop.value.code == 2 and len(err.splitlines()) == 1
        assert err.startswith(f"error: {message}; usage: python -m some.tool [-h] ")


def test_user_error_prints_one_line_and_gives_2(capsys):
    assert user_error(ValueError("a bad value\n  spread over lines")) == 2
    assert capsys.readouterr().err == "error: a bad value spread over lines\n"


@pytest.mark.parametrize("module", ["pipeline.readme_results", "pipeline.report.gate_probe",
                                    "pipeline.report.routing_ceiling", "pipeline.report.reclaim", "data.fetch",
                                    "data.tasks"])
def test_each_plain_tool_answers_a_mistyped_option_in_one_line(module):
    """The real entry points, as a user runs them: a mistyped option is one line, exit 2."""
    proc = subprocess.run([sys.executable, "-m", module, "--no-such-option"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, check=False)
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.splitlines()) == 1 and proc.stderr.startswith("error: ")
    assert f"usage: python -m {module} " in proc.stderr
