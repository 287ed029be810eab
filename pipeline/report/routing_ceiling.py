"""A committed MeteoRA route record's routing references, rebuilt offline: the causal ceiling of its validation rows
and what a one-token router scores there (``data.routing_ceiling``), beside the accuracy its gates reached.

    python -m pipeline.report.routing_ceiling outputs/records/meteora_tasks/route/meteora [--one-token]

The rows come from the record's own composed config (tasks, split, seeds, rows per task, max length; the tokenizer
at its ``model.name_or_path``, or the same model in this machine's cache), through the same
``data.batches.routed_rows`` the route stage used, so the numbers are the record's own ``router_accuracy_ceiling``
/ ``router_accuracy_one_token`` (and can be had for records made before the stage wrote them).
"""

from __future__ import annotations

import json
from pathlib import Path

from common.cli_args import ArgumentParser, user_error
from data.routing_ceiling import causal_routing_ceiling, one_token_routing
from pipeline.report.records import read_route_record


def ceiling_of_route_record(record_dir, one_token: bool = False) -> dict:
    """The ceiling of the validation rows a route record (committed or a run dir) was scored on, beside the
    accuracy the gates reached there, overall and per task; ``one_token`` adds the one-token router's score (the
    training rows too: a minute of tokenizing for meteora_tasks)."""
    from transformers import AutoTokenizer

    from data.assets import local_model_dir
    from data.batches import routed_rows, routed_rows_settings

    cfg, rec = read_route_record(record_dir)
    # the stage's tokenizer is this one with a pad token set and left padding: neither changes a row's ids
    tokenizer = AutoTokenizer.from_pretrained(str(local_model_dir(cfg["model"]["name_or_path"])))
    settings = routed_rows_settings(cfg, tokenizer, prompt_only=False)
    val = routed_rows(split=str(cfg["data"]["val_split"]), per_task=int(cfg["router"]["train"]["val_rows_per_task"]),
                      **settings)
    c = causal_routing_ceiling(val)
    gates = rec.get("router_accuracy_by_task") or {}
    out = {"rows": len(val), "tokens": c["tokens"], "ceiling": c["accuracy"],
           "router_accuracy": rec["metrics"].get("router_accuracy"),
           "by_task": {str(t): {"ceiling": c["by_task"].get(i), "router_accuracy": gates.get(str(t))}
                       for i, t in enumerate(cfg["tasks"])}}
    if one_token:
        train = routed_rows(split=str(cfg["data"]["train_split"]), per_task=int(cfg["router"]["train"]["rows_per_task"]),
                            **settings)
        one = one_token_routing(train, val)
        out["one_token"] = one["accuracy"]
        for i, t in enumerate(cfg["tasks"]):
            out["by_task"][str(t)]["one_token"] = one["by_task"].get(i)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = ArgumentParser(prog="python -m pipeline.report.routing_ceiling", description=__doc__.splitlines()[0])
    ap.add_argument("record", help="a MeteoRA route record dir (config.yaml.xz + metrics.json.xz)")
    ap.add_argument("--one-token", action="store_true", help="also what a router reading one token scores there")
    args = ap.parse_args(argv)  # a mistyped option is an error, not dropped: it must not lose --one-token
    try:
        got = ceiling_of_route_record(Path(args.record), one_token=args.one_token)
    except (ValueError, FileNotFoundError) as e:
        return user_error(e)
    print(json.dumps(got, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
