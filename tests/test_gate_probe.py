"""pipeline.report.gate_probe: per-layer linear probes beside a MeteoRA route record's gates.

The probe fitter on synthetic tokens (separable classes are learned, shuffled labels are not), and the whole tool on
a route record made from the committed one's config, narrowed to 3 BIG-bench tasks on the tiny random llama: its
rows are the record's validation rows, its gate column is the record's own per-projection accuracy, and bad input
is one line with exit 2.
"""

from __future__ import annotations

import json
import lzma
from pathlib import Path

import pytest
import torch
import yaml
from needs_assets import needs_task_files

from pipeline.report.gate_probe import fit_probe, main, parse_layers

ROOT = Path(__file__).resolve().parent.parent
RECORD = ROOT / "outputs" / "records" / "meteora_tasks" / "route" / "meteora"
TASKS = ["cs_algorithms", "winowhy", "strategyqa"]


def test_fit_probe_learns_separable_classes_and_not_shuffled_labels():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 16, generator=g) * 3
    y = torch.randint(0, 4, (2000,), generator=g)
    x = centers[y] + torch.randn(2000, 16, generator=g)
    x_val, y_val = x[1500:], y[1500:]
    good = fit_probe(x[:1500], y[:1500], x_val, y_val, 4, epochs=20, batch=256)
    assert good["val"] >= 0.97 and good["train"] >= 0.97
    shuffled = y[:1500][torch.randperm(1500, generator=g)]
    bad = fit_probe(x[:1500], shuffled, x_val, y_val, 4, epochs=20, batch=256)
    assert bad["val"] < 0.4  # chance is 0.25: the probe cannot score what the inputs do not carry


def test_parse_layers():
    assert parse_layers("0,last,3,3", 30) == [0, 3, 29]
    for bad in ("30", "-1", "x", ""):
        with pytest.raises(ValueError, match="not a layer of this 30-layer model"):
            parse_layers(bad, 30)


@pytest.fixture(scope="module")
def tiny_record(tmp_path_factory):
    """The committed meteora_tasks route record's config, narrowed to 3 tasks and 4 validation rows each, on the
    tiny random llama; its metrics name per-projection accuracies for the tiny model's 2 layers."""
    from data.assets import model_dir

    d = tmp_path_factory.mktemp("route_record")
    with lzma.open(RECORD / "config.yaml.xz", "rt") as f:
        cfg = yaml.safe_load(f)
    cfg["tasks"] = TASKS
    cfg["model"]["name_or_path"] = str(model_dir("tiny-random-llama"))
    cfg["router"]["train"]["val_rows_per_task"] = 4
    with lzma.open(d / "config.yaml.xz", "wt") as f:
        yaml.safe_dump(cfg, f)
    rec = {"stage": "route", "adapters": TASKS, "target_accuracy": 0.9,
           "metrics": {"router_accuracy": 0.5, "steps": 10},
           "provenance": {"git_sha": "0" * 40},
           "router_accuracy_by_projection": {"model__layers__0__self_attn__q_proj": 0.25,
                                             "model__layers__1__self_attn__q_proj": 0.75}}
    with lzma.open(d / "metrics.json.xz", "wt") as f:
        json.dump(rec, f)
    return d


@needs_task_files
def test_gate_probe_on_a_route_record(tiny_record, tmp_path):
    out = tmp_path / "tables"
    assert main([str(tiny_record), "--per-task", "4", "--layers", "0,last", "--epochs", "3", "--out", str(out)]) == 0
    doc = json.loads((out / "gate_probe.json").read_text())
    assert [r["layer"] for r in doc["rows"]] == [0, 1]
    assert [r["gate_q_proj"] for r in doc["rows"]] == [0.25, 0.75]  # the record's own gates, per layer
    for r in doc["rows"]:
        assert 0 <= r["probe_val"] <= 1 and 0 <= r["probe_train"] <= 1
    s = doc["setting"]
    assert s["val_rows"] == 3 * 4 and s["train_rows"] == 3 * 4 and s["adapters"] == 3
    assert s["train_tokens"] > s["train_rows"] and s["val_tokens"] > s["val_rows"]
    assert doc["best_probe"] == max(r["probe_val"] for r in doc["rows"])
    assert doc["pooled_probe"] == pytest.approx(sum(r["probe_val"] for r in doc["rows"]) / 2, abs=1e-4)
    assert doc["best_probe_reaches_target"] == (doc["best_probe"] >= 0.9)
    assert doc["record"]["git_sha"] == "0" * 40 and len(doc["provenance"]["git_sha"]) >= 40
    page = (out / "gate_probe.md").read_text()
    assert "| 1 |" in page and "0.7500" in page and str(tiny_record) in page
    # the validation accuracy split into answer and prompt tokens: their token-weighted mean is the whole
    n_answers = s["val_answer_tokens"]
    assert 3 * 4 <= n_answers < s["val_tokens"]  # every row has an answer token (its EOS at least), and a prompt
    for r in doc["rows"]:
        whole = (r["probe_val_answers"] * n_answers + r["probe_val_prompts"] * (s["val_tokens"] - n_answers))
        assert whole / s["val_tokens"] == pytest.approx(r["probe_val"], abs=2e-4)
    assert doc["best_probe_answers"] == max(r["probe_val_answers"] for r in doc["rows"])
    assert all(0 <= r["probe_answers_fit"] <= 1 and 0 <= r["probe_answers_fit_train"] <= 1 for r in doc["rows"])
    assert doc["best_probe_answers_fit"] == max(r["probe_answers_fit"] for r in doc["rows"])
    assert "| fitted on answers alone (answer tokens) |" in page and "fitted on the training rows' answer" in page
    assert "| on answer tokens | on prompt tokens |" in page and "On the answer tokens alone" in page


@needs_task_files
def test_routed_rows_mark_where_each_answer_starts(tiny_record):
    """``routed_rows``' ``prompt_len``: the prompt's token count, so that input_ids[prompt_len:] is the answer
    (+ EOS) as ``encode_pairs`` builds it, whether the LM labels cover the prompt (MeteoRA's) or not; a
    ``prompt_only`` row is all prompt. The collator's ``answer_mask`` marks exactly those tokens."""
    from transformers import AutoTokenizer

    from data.batches import RoutedRowsCollator, encode_pairs, routed_rows, routed_rows_settings
    from data.task_rows import task_rows

    with lzma.open(tiny_record / "config.yaml.xz", "rt") as f:
        cfg = yaml.safe_load(f)
    tok = AutoTokenizer.from_pretrained(cfg["model"]["name_or_path"])
    settings = routed_rows_settings(cfg, tok, prompt_only=False)
    rows = routed_rows(split=str(cfg["data"]["val_split"]), per_task=3, **settings)
    for task_id, task in enumerate(TASKS):
        mine = [r for r in rows if r["task_id"] == task_id]
        src = task_rows(task, str(cfg["data"]["val_split"]), 3, int(cfg["data"]["split_seed"]))
        built = encode_pairs(tok, [r["prompt"] for r in src], [r["answer"] for r in src], settings["max_length"],
                             settings["append_eos"])
        assert sorted((r["input_ids"], r["prompt_len"]) for r in mine) == sorted(
            (b["input_ids"], b["labels"].count(-100)) for b in built)
    assert all(r["labels"] == r["input_ids"] for r in rows)  # MeteoRA's LM loss on the prompt too
    assert all(0 < r["prompt_len"] < len(r["input_ids"]) for r in rows)
    batch = RoutedRowsCollator(tok.pad_token_id, answer_mask=True)(rows[:4])
    for i, r in enumerate(rows[:4]):
        want = [0] * r["prompt_len"] + [1] * (len(r["input_ids"]) - r["prompt_len"])
        assert batch["answer_mask"][i].tolist() == want + [0] * (batch["answer_mask"].shape[1] - len(want))
    only = routed_rows(split=str(cfg["data"]["val_split"]), per_task=2, **{**settings, "prompt_only": True})
    assert all(r["prompt_len"] == len(r["input_ids"]) for r in only)


def test_gate_probe_bad_input_is_one_line_exit_2(tiny_record, tmp_path, capsys):
    out = tmp_path / "tables"
    assert main([str(tmp_path), "--out", str(out)]) == 2
    assert "is not a route record" in capsys.readouterr().err
    assert main([str(tiny_record), "--layers", "0,7", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not a layer of this 2-layer model" in err
    assert not out.exists()  # nothing written on bad input
    afile = tmp_path / "afile"
    afile.write_text("kept")
    assert main([str(tiny_record), "--out", str(afile / "tables")]) == 2  # refused before the forward passes
    assert capsys.readouterr().err == (f"error: --out {afile / 'tables'}: {afile} is a file, not a directory; "
                                       "give a directory for gate_probe.json / .md\n")
    assert afile.read_text() == "kept"
    with pytest.raises(SystemExit) as stop:  # argparse's own errors: one line too, with the usage on it
        main([str(tiny_record), "--per-tsk", "3"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and len(err.splitlines()) == 1
    assert err.startswith("error: unrecognized arguments: --per-tsk 3; usage: python -m pipeline.report.gate_probe ")
