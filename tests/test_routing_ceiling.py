"""data.routing_ceiling: the best causal token router's accuracy on labelled rows, counted by hand on small cases."""

import pytest
from needs_assets import needs_bigbench

from data.routing_ceiling import causal_routing_ceiling, one_token_routing


def test_shared_prefixes_cap_what_any_causal_router_gets_right():
    rows = [{"input_ids": [1, 2, 3], "task_id": 0},   # tokens 1, 2 shared with the task-1 row: a tie there
            {"input_ids": [1, 2, 4], "task_id": 1},
            {"input_ids": [5, 6], "task_id": 1}]      # nothing shared: every token routable
    got = causal_routing_ceiling(rows)
    # prefixes [1] and [1, 2]: one row of each task, the router names one (task 0, counted first): 2 hits of 4
    # tokens there; [1, 2, 3], [1, 2, 4], [5], [5, 6]: 4 hits
    assert got["tokens"] == 8 and got["accuracy"] == 6 / 8
    assert got["by_task"] == {0: 1.0, 1: 0.6}  # task 0: 3 of 3; task 1: [1,2,4]'s last token + 2 = 3 of 5


def test_distinct_rows_are_fully_routable_and_identical_rows_are_not():
    assert causal_routing_ceiling([{"input_ids": [i, 7], "task_id": i % 3} for i in range(6)])["accuracy"] == 1.0
    same = [{"input_ids": [9, 9, 9], "task_id": t} for t in (0, 1, 1, 2)]
    assert causal_routing_ceiling(same) == {"accuracy": 0.5, "by_task": {0: 0.0, 1: 1.0, 2: 0.0}, "tokens": 12}


def test_a_one_token_router_names_each_token_ids_majority_task_of_the_training_rows():
    train = [{"input_ids": [1, 2, 2], "task_id": 0},   # token 2: task 0 twice, task 1 once -> task 0
             {"input_ids": [2, 3], "task_id": 1},      # token 3: task 1; token 1: task 0
             {"input_ids": [4, 4, 4, 4], "task_id": 2}]  # task 2 has the most training tokens: unseen ids go there
    rows = [{"input_ids": [1, 2, 3], "task_id": 0},    # 1 -> 0 hit, 2 -> 0 hit, 3 -> 1 miss
            {"input_ids": [3, 9], "task_id": 1},       # 3 -> 1 hit, 9 unseen -> 2 miss
            {"input_ids": [9], "task_id": 2}]          # unseen -> 2 hit
    got = one_token_routing(train, rows)
    assert got == {"accuracy": round(4 / 6, 6), "by_task": {0: round(2 / 3, 6), 1: 0.5, 2: 1.0}, "tokens": 6}
    # context decides where one token cannot: the causal ceiling on the same rows is higher
    assert causal_routing_ceiling(rows)["accuracy"] > got["accuracy"]
    with pytest.raises(ValueError, match="needs training rows"):
        one_token_routing([], rows)


def test_the_table_router_line_gives_the_ceiling_where_the_route_record_has_it():
    from pipeline.report.paper_tables import router_info, router_line

    route = {"stage": "route", "strategy": "meteora", "metrics": {"router_accuracy": 0.7, "steps": 10},
             "router_accuracy_curve": [[10, 0.7]], "target_accuracy": 0.9, "target_reached_step": None}
    assert "causal" not in router_line(router_info(route))  # records made before the ceiling: as they were
    line = router_line(router_info({**route, "router_accuracy_ceiling": 0.9321}))
    assert "validation routing accuracy 0.7 after 10 steps" in line and "validation rows (their shared prefixes): 0.9321" in line
    assert "one token" not in line
    line = router_line(router_info({**route, "router_accuracy_one_token": 0.367}))
    assert "a router reading one token (a layer-0 q / k / v gate's view) scores 0.367 there" in line


@needs_bigbench
def test_the_committed_route_record_rebuilds_its_validation_rows(tmp_path):
    """python -m pipeline.report.routing_ceiling on the committed meteora_tasks route record: its validation rows rebuilt from
    its own config, the ceiling above the gates' accuracy, every task scored (needs the SmolLM2 tokenizer at the
    record's model path and BIG-bench here: skipped where they are not)."""
    import lzma
    from pathlib import Path

    import pytest
    import yaml

    from pipeline.report.routing_ceiling import ceiling_of_route_record

    record = Path(__file__).resolve().parent.parent / "outputs/records/meteora_tasks/route/meteora"
    if not (record / "config.yaml.xz").is_file():
        pytest.skip("no committed route record with its config")
    from data.assets import local_model_dir

    with lzma.open(record / "config.yaml.xz", "rt") as f:
        recorded = yaml.safe_load(f)["model"]["name_or_path"]
    try:
        model_path = local_model_dir(recorded)
    except ValueError as e:
        pytest.skip(str(e))
    if not (model_path / "tokenizer.json").is_file():
        pytest.skip(f"the record's tokenizer is not at {model_path} (make assets builds it)")
    got = ceiling_of_route_record(record)
    assert got["router_accuracy"] < got["ceiling"] <= 1 and got["rows"] > 0
    assert all(v["ceiling"] is not None and v["router_accuracy"] is not None for v in got["by_task"].values())


def test_the_router_line_says_whether_the_adapters_were_trained_with_the_gates(tmp_path):
    """The route run's own config (its config.yaml beside metrics.json) decides: router.train.train_loras=true puts
    "trained together with the LoRA weights" in the table's router line; false, or no config, leaves it out. The
    validation LM loss is given where the record has it."""
    from pipeline.report.paper_tables import router_info, router_line

    route = {"stage": "route", "strategy": "meteora", "metrics": {"router_accuracy": 0.9161, "steps": 3000,
                                                                 "lm_loss": 4.6828}}
    assert "together" not in router_line(router_info(route)) and "LM loss 4.683" in router_line(router_info(route))
    for flag in (True, False):
        run = tmp_path / str(flag)
        run.mkdir()
        (run / "config.yaml").write_text(f"router:\n  train:\n    train_loras: {str(flag).lower()}\n")
        info = router_info({**route, "_path": str(run / "metrics.json")})
        assert info["train_loras"] is flag
        assert ("trained together with the LoRA weights" in router_line(info)) is flag


def test_the_record_tool_names_the_fix_for_a_dir_that_is_no_route_record(tmp_path, capsys):
    from pipeline.report.routing_ceiling import main

    assert main([str(tmp_path)]) == 2
    assert "is not a route record" in capsys.readouterr().err
    import pytest

    with pytest.raises(SystemExit) as stop:
        main([])
    assert stop.value.code == 2 and capsys.readouterr().err == (
        "error: the following arguments are required: record; usage: python -m pipeline.report.routing_ceiling "
        "[-h] [--one-token] record\n")


def test_the_table_splits_the_gates_accuracy_into_answers_and_prompts_where_the_record_does():
    """A route record with ``router_accuracy_answers`` (routes since the split was recorded): the router line gives
    both spans and each meteora_tasks row its answer tokens' accuracy (``gate_accuracy_answers``, right after
    ``gate_accuracy``); an older record's table keeps its columns as they were."""
    from pipeline.report.paper_tables import meteora_tasks, router_info, router_line

    route = {"stage": "route", "strategy": "meteora", "metrics": {"router_accuracy": 0.72, "steps": 10},
             "router_accuracy_by_task": {"a": 0.6, "b": 0.8}}
    split = {**route, "router_accuracy_answers": 0.9412, "router_accuracy_prompts": 0.7,
             "router_accuracy_answers_by_task": {"a": 0.88, "b": 1.0}}
    line = router_line(router_info(split))
    assert ("validation routing accuracy 0.72 after 10 steps; 0.9412 on the answer tokens (where it routes while "
            "the model writes), 0.7 on the prompt tokens") in line
    assert "answer tokens" not in router_line(router_info(route))
    ev = {"stage": "evaluate", "strategy": "oracle", "tasks": ["a", "b"],
          "metrics": {"a/accuracy": 0.5, "b/accuracy": 0.25}}
    rows = meteora_tasks([ev, split])["rows"]
    assert [r["gate_accuracy_answers"] for r in rows] == [0.88, 1.0]
    keys = list(rows[0])
    assert keys[keys.index("gate_accuracy") + 1] == "gate_accuracy_answers"
    assert all("gate_accuracy_answers" not in r for r in meteora_tasks([ev, route])["rows"])


def test_the_record_tool_refuses_another_stages_record_and_an_unknown_option(capsys):
    """An evaluate record beside the route one (it has a config too, with no router.train), and a mistyped
    --one-token (which used to be dropped without a word): each one line naming the fix, exit 2."""
    from pathlib import Path

    from pipeline.report.routing_ceiling import main

    records = Path(__file__).resolve().parent.parent / "outputs" / "records" / "meteora_tasks"
    assert main([str(records / "evaluate" / "oracle")]) == 2
    err = capsys.readouterr().err
    assert err == (f"error: {records / 'evaluate' / 'oracle'} holds a record of the evaluate stage, not "
                   "of route: give the route run's dir, e.g. outputs/records/meteora_tasks/route/meteora\n")
    import pytest

    with pytest.raises(SystemExit) as stop:
        main([str(records / "route" / "meteora"), "--one-tokn"])
    assert stop.value.code == 2 and capsys.readouterr().err == (
        "error: unrecognized arguments: --one-tokn; usage: python -m pipeline.report.routing_ceiling [-h] "
        "[--one-token] record\n")
