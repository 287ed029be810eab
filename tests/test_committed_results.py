"""What is committed was written by code: every committed paper table's claims recompute from its own rows, every
table whose raw records are committed rebuilds from them offline, and README Results' generated blocks are what
the committed tables give (numbers and verdicts)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from pipeline.report.paper_claims import table_claims
from pipeline.stages.readme_results import PAPER_FILES, blocks, main, records_status, stale_blocks

ROOT = Path(__file__).resolve().parent.parent
TABLES = ROOT / "outputs" / "tables"
RECORDS = ROOT / "outputs" / "records"
COMMITTED = [n for n in PAPER_FILES if (TABLES / f"{n}.json").is_file()]


def _plain(x):
    return json.loads(json.dumps(x))  # int dict keys -> strings, as the committed JSON has them


def test_the_paper_tables_are_committed():
    assert {"meteora_tasks", "meteora_composite", "dlp_tasks", "head_to_head", "dlp_latency"} <= set(COMMITTED)


def _shas(node):
    """Every ``git_sha`` value anywhere in a table's JSON (provenance, by_run, rows' runs)."""
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "git_sha":
                yield from (v if isinstance(v, list) else [v])
            else:
                yield from _shas(v)
    elif isinstance(node, list):
        for v in node:
            yield from _shas(v)


@pytest.mark.parametrize("path", sorted(TABLES.glob("*.json")), ids=lambda p: p.stem)
def test_every_committed_table_names_the_code_that_ran(path):
    shas = list(_shas(json.loads(path.read_text())))
    assert shas and all(s and str(s).split("+")[0] not in ("unknown", "None") for s in shas), (path.name, shas)


@pytest.mark.parametrize("name", COMMITTED)
def test_committed_claims_recompute_from_their_rows(name):
    table = json.loads((TABLES / f"{name}.json").read_text())
    body = {k: v for k, v in table.items() if k != "claims"}
    recomputed = _plain(table_claims(table["table"], body))
    assert [c["claim"] for c in recomputed] == [c["claim"] for c in table["claims"]]
    for got, want in zip(recomputed, table["claims"]):
        assert got["measured"] == want["measured"], want["claim"]
        assert got["holds"] == want["holds"], want["claim"]
        if "verdict" in want and want.get("interval") is None:  # with an interval, the records decide (below)
            assert got["verdict"] == want["verdict"], want["claim"]


@pytest.mark.parametrize("name", COMMITTED)
def test_tables_rebuild_from_their_committed_records_or_say_they_cannot(name):
    from pipeline.report.paper_tables import build_paper_table
    from pipeline.report.records import read_records

    table = json.loads((TABLES / f"{name}.json").read_text())
    status = records_status(name, table, RECORDS)
    if not (RECORDS / name / "index.json").is_file():
        assert "not committed" in status  # said in README Results and the table's provenance
        return
    rebuilt = _plain(build_paper_table(table["table"], read_records(RECORDS / name)))
    for key in ("rows", "claims", *(["grouped"] if "grouped" in table else [])):
        assert rebuilt[key] == table[key], key
    assert rebuilt["provenance"]["by_run"] == table["provenance"]["by_run"]


def test_latency_table_says_which_routers_decoded_grouped():
    from pipeline.report.paper_tables import latency_grouped

    rows = [{"strategy": "dlp", "grouped": True}, {"strategy": "dlp", "grouped": False},
            {"strategy": "meteora-top2", "grouped": False}, {"strategy": "base", "grouped": False}, {"strategy": "peft"}]
    assert latency_grouped(rows) == {"dlp": "mixed", "meteora-top2": "no"}  # the routers' columns only
    assert latency_grouped(rows[:1]) == {"dlp": "yes"} and latency_grouped([{"strategy": "dlp"}]) == {}
    table = json.loads((TABLES / "dlp_latency.json").read_text())
    if "grouped" in table:  # tables since the bench recorded it: the page says it
        assert "decoded through the bank's projection groups" in (TABLES / "dlp_latency.md").read_text()


def test_readme_results_blocks_are_the_committed_tables():
    assert stale_blocks(ROOT / "README.md", TABLES) == []
    assert main(["--check"]) == 0  # the command's own defaults name this checkout's README and tables
    text = (ROOT / "README.md").read_text()
    generated = blocks(TABLES)
    for name in COMMITTED:  # every claim's verdict of every committed table is in README Results
        for c in json.loads((TABLES / f"{name}.json").read_text())["claims"]:
            assert c["claim"] in generated["claims"] and c["claim"] in text


def test_a_stale_readme_block_is_found_and_rewritten(tmp_path, capsys):
    readme = tmp_path / "README.md"
    shutil.copy(ROOT / "README.md", readme)
    text = readme.read_text()
    stale = text.replace("| `dlp_tasks` | 4.", "| `dlp_tasks` | 4. (edited by hand)", 1)
    assert stale != text
    readme.write_text(stale)
    assert stale_blocks(readme, TABLES) == ["claims"]
    assert main(["--readme", str(readme), "--tables", str(TABLES), "--check"]) == 1
    assert "claims" in capsys.readouterr().err
    assert main(["--readme", str(readme), "--tables", str(TABLES)]) == 0
    assert readme.read_text() == text
    readme.write_text(text.replace("<!-- /generated:claims -->", ""))
    assert main(["--readme", str(readme), "--tables", str(TABLES)]) == 2
    assert "generated block 'claims'" in capsys.readouterr().err


@pytest.mark.parametrize(("argv", "line"), [
    (["--tables", "{tmp}/nosuch"], r"tables dir '.*/nosuch' does not exist; give the committed tables' dir, .*"),
    (["--tables", "{tmp}"], r"tables dir '.*' holds no table \(\*\.json\); give the committed tables' dir, .*"),
    (["--check", "--tables", "{tmp}/nosuch"], r"tables dir '.*/nosuch' does not exist; .*"),
    (["--check", "--readme", "{tmp}"], r"readme '.*' is a directory; give the repository's README.md .*"),
    (["--check", "--readme", "{tmp}/nosuch.md"], r"readme '.*/nosuch.md' does not exist; give the repository's .*"),
])
def test_a_mistyped_readme_or_tables_path_is_one_line_and_the_readme_is_kept(tmp_path, capsys, argv, line):
    """A tables dir that is not there (or holds no table) would make every block say "not committed": written
    over the README, that drops all its results, so it is refused; a README path that is a directory or missing is
    one line too (it was a traceback / a bare errno line)."""
    import re

    readme = tmp_path / "README.md"
    shutil.copy(ROOT / "README.md", readme)
    argv = [a.format(tmp=tmp_path) for a in argv]
    assert main(["--readme", str(readme), *argv]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and re.fullmatch(f"error: {line}", err.strip()), err
    assert readme.read_bytes() == (ROOT / "README.md").read_bytes()


def test_a_tables_dir_of_some_tables_only_is_refused_unless_told_to_drop_the_rest(tmp_path, capsys):
    """A dir that holds some of the committed tables (another output root's, say): rendered from it, README Results
    would lose every table it lacks, so it is one line naming them, README untouched; ``--drop-missing`` lets them
    go on purpose (the blocks then say "not committed"); the full dir passes."""
    readme = tmp_path / "README.md"
    shutil.copy(ROOT / "README.md", readme)
    some = tmp_path / "tables"
    some.mkdir()
    for name in ("dlp_tasks", "kernel_bench"):
        shutil.copy(TABLES / f"{name}.json", some)
    assert main(["--readme", str(readme), "--tables", str(some)]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "lacks meteora_tasks.json" in err and "e2e_decode.json" in err
    assert "dlp_tasks.json" not in err and "kernel_bench.json," not in err and "--drop-missing" in err
    assert readme.read_bytes() == (ROOT / "README.md").read_bytes()
    assert main(["--readme", str(readme), "--tables", str(some), "--drop-missing"]) == 0
    dropped = readme.read_text()
    assert "_e2e_decode.json is not committed_" in dropped and "`meteora_tasks`" not in dropped.split(
        "<!-- /generated:claims -->")[0].split("<!-- generated:claims")[1]
    shutil.copy(ROOT / "README.md", readme)
    assert main(["--readme", str(readme), "--tables", str(TABLES)]) == 0 and readme.read_bytes() == (
        ROOT / "README.md").read_bytes()


def test_a_table_made_on_the_stand_in_never_enters_readme(tmp_path, capsys):
    """A table whose runs read the generated stand-in task files (data/standin.py) is refused in one line, README
    untouched: its numbers test the plumbing only. No committed table is one."""
    from data.standin import SOURCE, names_standin

    assert not any(names_standin(json.loads(p.read_text()).get("provenance", {}).get("bigbench"))
                   for p in TABLES.glob("*.json"))
    readme = tmp_path / "README.md"
    shutil.copy(ROOT / "README.md", readme)
    tables = tmp_path / "tables"
    shutil.copytree(TABLES, tables)
    table = json.loads((tables / "dlp_tasks.json").read_text())
    table["provenance"]["bigbench"] = [SOURCE, "sdist bigbench==1.0.0 sha256 x"]  # one of its runs read it
    (tables / "dlp_tasks.json").write_text(json.dumps(table))
    assert main(["--readme", str(readme), "--tables", str(tables)]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "dlp_tasks.json" in err and "stand-in" in err
    assert readme.read_bytes() == (ROOT / "README.md").read_bytes()


def test_reclaim_recomputes_a_recordless_tables_claims_from_its_rows_and_refuses_one_with_records(tmp_path, capsys):
    """``python -m pipeline.report.reclaim``: a committed table without records gets its claims again by today's
    rule from its own rows (the rows, provenance and everything else as they were; its page rewritten); a table
    whose records are committed is refused (rebuild it from them), as is a file that is no table."""
    from pipeline.report.reclaim import main, reclaim

    table = json.loads((TABLES / "meteora_composite.json").read_text())
    stale = {**table, "claims": [{**table["claims"][0], "holds": "stale", "measured": {}}]}
    path = tmp_path / "meteora_composite.json"
    path.write_text(json.dumps(stale))
    got = reclaim(path, records_root=tmp_path / "records")
    written = json.loads(path.read_text())
    assert written == _plain(got) and written["claims"] == table["claims"]  # today's rule, from the rows alone
    assert {k: v for k, v in written.items() if k != "claims"} == {k: v for k, v in table.items() if k != "claims"}
    assert (tmp_path / "meteora_composite.md").read_text().startswith("# meteora_composite")
    (tmp_path / "records" / "meteora_composite").mkdir(parents=True)
    (tmp_path / "records" / "meteora_composite" / "index.json").write_text("{}")
    with pytest.raises(ValueError, match="records are committed: rebuild it from them"):
        reclaim(path, records_root=tmp_path / "records")
    # by default the records are looked for beside the table's own dir, whatever the working directory
    (tmp_path / "tables").mkdir()
    (tmp_path / "tables" / "meteora_composite.json").write_text(json.dumps(stale))
    with pytest.raises(ValueError, match="records are committed"):
        reclaim(tmp_path / "tables" / "meteora_composite.json")
    (tmp_path / "x.json").write_text("[1]")
    assert main([str(tmp_path / "x.json")]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "is not a paper table" in err
