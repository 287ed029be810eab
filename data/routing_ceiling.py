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
    hits, tokens = Counter(), Counter()
    for row, path in zip(rows, paths):
        task = row["task_id"]
        hits[task] += sum(top[node] == task for node in path)
        tokens[task] += len(path)
    total = sum(tokens.values())
    return {"accuracy": round(sum(hits.values()) / total, 6) if total else None,
            "by_task": {k: round(hits[k] / tokens[k], 6) for k in sorted(tokens)}, "tokens": total}
