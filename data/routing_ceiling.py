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

The route stage records both references beside its gates' accuracy; ``python -m pipeline.report.routing_ceiling
<route record>`` rebuilds them from a committed record.
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
