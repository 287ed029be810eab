"""The most a causal token router can score on a set of labelled rows: its routing accuracy ceiling.

MeteoRA's gates route each token from that token's hidden state, which (in a decoder) depends on the tokens up to
and including it, nothing later. Rows of different tasks that begin with the same tokens (a chat template, a shared
instruction, "Translate into" before the language name) are therefore the same input to every gate at those
positions, and no gate can tell their tasks apart there. The best any causal router can do at a prefix is to name
the task most of the rows sharing that prefix belong to; summed over every labelled token of every row, that is
the ceiling below.

It is computed on the rows themselves (the validation rows the route stage scores), so it is an upper bound, and
an optimistic one: it knows those rows' prefix statistics exactly. A gate whose accuracy is far below it is limited
by itself (capacity, training); one close to it, by the data.

    ceiling = causal_routing_ceiling(rows)     # rows: {"input_ids": [...], "task_id": int}, every token labelled
    ceiling["accuracy"], ceiling["by_task"]    # overall and per task id
"""

from __future__ import annotations

from collections import Counter, defaultdict


def causal_routing_ceiling(rows: list[dict]) -> dict:
    """``{"accuracy": float, "by_task": {task_id: float}, "tokens": int}`` over every token of ``rows``: the share of
    tokens the best causal router gets right (at each prefix it names the majority task of the rows sharing it;
    per task: the tokens of that task's rows where the majority is that task, ties to the task counted first)."""
    node_of: dict = {}  # (parent node, token id) -> node: a trie of the rows' prefixes
    counts: dict = defaultdict(Counter)  # node -> tasks of the rows through it
    paths = []
    for row in rows:
        node, path = -1, []
        for tok in row["input_ids"]:
            node = node_of.setdefault((node, int(tok)), len(node_of))
            counts[node][row["task_id"]] += 1
            path.append(node)
        paths.append(path)
    top = {node: c.most_common(1)[0][0] for node, c in counts.items()}
    return _scored(rows, [[top[node] for node in path] for path in paths])


def _scored(rows: list[dict], routed: list[list[int]]) -> dict:
    """``{"accuracy", "by_task", "tokens"}`` of a router that sent each token of ``rows`` to ``routed`` (per row,
    per token): overall and per task, the share of tokens routed to their row's task."""
    hits, tokens = Counter(), Counter()
    for row, tasks in zip(rows, routed, strict=True):
        hits[row["task_id"]] += sum(t == row["task_id"] for t in tasks)
        tokens[row["task_id"]] += len(tasks)
    total = sum(tokens.values())
    return {"accuracy": round(sum(hits.values()) / total, 6) if total else None,
            "by_task": {k: round(hits[k] / tokens[k], 6) for k in sorted(tokens)}, "tokens": total}


def one_token_routing(train_rows: list[dict], rows: list[dict]) -> dict:
    """``{"accuracy", "by_task", "tokens"}`` of the router that reads one token and nothing before it: each token id
    goes to the task it most often belongs to in ``train_rows`` (ties: the task counted first; an id never seen
    there: the task with the most training tokens), scored on every token of ``rows``.

    What it is for: a layer-0 q / k / v gate reads only its token's (normed) embedding, so it sees what this
    router sees; later gates read context. Where the gates' accuracy sits near this and far below the causal
    ceiling, the early layers' gates are what hold the pooled accuracy down. (It is the plug-in estimate from the
    training rows, so it may fall a little below the best one-token router on ``rows``.)"""
    by_token: dict = defaultdict(Counter)
    per_task = Counter()
    for row in train_rows:
        for tok in row["input_ids"]:
            by_token[int(tok)][row["task_id"]] += 1
        per_task[row["task_id"]] += len(row["input_ids"])
    if not per_task:
        raise ValueError("one_token_routing needs training rows")
    fallback = per_task.most_common(1)[0][0]
    top = {tok: c.most_common(1)[0][0] for tok, c in by_token.items()}
    return _scored(rows, [[top.get(int(tok), fallback) for tok in row["input_ids"]] for row in rows])


def ceiling_of_route_record(record_dir, one_token: bool = False) -> dict:
    """The ceiling of the validation rows a committed route record was scored on, rebuilt from its own composed
    config (``config.yaml.xz``: tasks, split, seeds, rows per task, max length; the tokenizer at its
    ``model.name_or_path``, or the same model in this machine's cache), beside the accuracy the gates reached
    there, overall and per task."""
    import json
    import lzma
    from pathlib import Path

    import yaml
    from transformers import AutoTokenizer

    from data.assets import local_model_dir
    from data.batches import routed_rows, routed_rows_settings

    record_dir = Path(record_dir)
    with lzma.open(record_dir / "config.yaml.xz", "rt") as f:
        cfg = yaml.safe_load(f)
    with lzma.open(record_dir / "metrics.json.xz", "rt") as f:
        rec = json.load(f)
    # the stage's tokenizer is this one with a pad token set and left padding: neither changes a row's ids
    tokenizer = AutoTokenizer.from_pretrained(str(local_model_dir(cfg["model"]["name_or_path"])))
    val = routed_rows(split=str(cfg["data"]["val_split"]), per_task=int(cfg["router"]["train"]["val_rows_per_task"]),
                      **routed_rows_settings(cfg, tokenizer, prompt_only=False))
    c = causal_routing_ceiling(val)
    gates = rec.get("router_accuracy_by_task") or {}
    out = {"rows": len(val), "tokens": c["tokens"], "ceiling": c["accuracy"],
           "router_accuracy": rec["metrics"].get("router_accuracy"),
           "by_task": {str(t): {"ceiling": c["by_task"].get(i), "router_accuracy": gates.get(str(t))}
                       for i, t in enumerate(cfg["tasks"])}}
    if one_token:  # the training rows too (every task's rows_per_task: a minute of tokenizing for meteora_tasks)
        train = routed_rows(split=str(cfg["data"]["train_split"]), per_task=int(cfg["router"]["train"]["rows_per_task"]),
                            **routed_rows_settings(cfg, tokenizer, prompt_only=False))
        one = one_token_routing(train, val)
        out["one_token"] = one["accuracy"]
        for i, t in enumerate(cfg["tasks"]):
            out["by_task"][str(t)]["one_token"] = one["by_task"].get(i)
    return out


if __name__ == "__main__":  # python -m data.routing_ceiling outputs/records/<experiment>/route/meteora [--one-token]
    import json
    import sys

    print(json.dumps(ceiling_of_route_record(sys.argv[1], one_token="--one-token" in sys.argv[2:]), indent=1))
