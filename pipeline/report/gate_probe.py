"""How far a linear gate can go: per-layer linear probes on the rows a MeteoRA route record was scored on.

    python -m pipeline.report.gate_probe outputs/records/meteora_tasks/route/meteora            # the committed run
    python -m pipeline.report.gate_probe <route record dir> --per-task 60 --layers 0,3,29 --out outputs/tables

MeteoRA's gate in a projection is ``Linear(d_in, L)`` on that projection's input, and its routing accuracy is the
share of tokens whose top-1 is the row's task. A route run that stops below its target accuracy leaves a question
the run cannot answer: were the gates under-trained, or can no linear function of those inputs do better? This
tool answers the second half. It rebuilds the record's validation rows (its own composed config: tasks, split,
rows per task, max length, the same tokenizer; ``data.batches.routed_rows``) and ``per_task`` training rows of
each task, runs the base model over them (no adapters), catches the input of each chosen layer's ``q_proj`` (what
the q / k / v gates read), and fits one multinomial logistic regression per layer on the training tokens (AdamW,
full passes, fixed seed). It then scores each probe on the validation tokens, beside the accuracy the record's
gates reached at the same layer (``router_accuracy_by_projection``), and on the answer tokens apart from the
prompt's (a row's answer starts at its ``prompt_len``): the answers are what a gate routes while the model writes,
after the whole prompt, while a prompt's first tokens may read alike across tasks. A second probe per layer is
fitted on the answer tokens alone (``probe_answers_fit``): whether a gate that learned only where it matters could
route the answers, which the whole-row probe, fitted mostly on prompt tokens, may not.

What it measures, and what not:
- The probes see the base model's hidden states; the gates saw those of the model with the routed adapters added,
  which differ a little. The probes also see fewer training rows than a route run. So their accuracy is an
  estimate of what a converged linear gate reaches here, not an upper bound.
- ``pooled_probe`` is the mean of the probes over the probed layers. With evenly spaced layers it estimates the
  pooled accuracy of converged q / k / v gates. When even the best layer's probe falls short of the target, no
  amount of gate training reaches the target with linear gates on this model.

Writes ``<out>/gate_probe.{json,md}`` (provenance: this code's git sha, device, versions, date, the record it read
and that record's sha). Minutes on a CPU (the forward passes); seconds on a GPU.
"""

from __future__ import annotations

import datetime as _dt
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from common.atomic import atomic_write_text, file_in_the_way
from common.cli_args import ArgumentParser, user_error
from common.provenance import device_name, git_sha, versions
from pipeline.report.paper_tables import _mean
from pipeline.report.records import read_route_record

DEFAULT_LAYERS = "0,3,6,9,12,15,18,21,24,27,last"


def projection_inputs(model, rows: list[dict], layers: list[int]) -> tuple[dict[int, torch.Tensor], torch.Tensor,
                                                                          torch.Tensor]:
    """``({layer: [tokens, d_in] fp16}, labels [tokens], answers [tokens] bool)``: the input of each layer's
    ``self_attn.q_proj`` for every token of ``rows`` (one row a forward, no padding), each token's task id, and
    whether it is an answer token (at or after the row's ``prompt_len``)."""
    caught: dict[int, list[torch.Tensor]] = {i: [] for i in layers}
    hooks = [model.model.layers[i].self_attn.q_proj.register_forward_pre_hook(
        lambda m, args, i=i: caught[i].append(args[0][0].to(torch.float16))) for i in layers]
    labels, answers = [], []
    try:
        with torch.no_grad():
            for row in rows:
                ids = torch.tensor(row["input_ids"], device=model.device)[None]
                model(input_ids=ids)
                labels.append(torch.full((ids.shape[1],), int(row["task_id"])))
                answers.append(torch.arange(ids.shape[1]) >= int(row["prompt_len"]))
    finally:
        for h in hooks:
            h.remove()
    return {i: torch.cat(caught[i]).cpu() for i in layers}, torch.cat(labels), torch.cat(answers)


def fit_probe(x: torch.Tensor, y: torch.Tensor, x_val: torch.Tensor, y_val: torch.Tensor, num_classes: int,
              epochs: int = 15, lr: float = 3e-3, batch: int = 2048, seed: int = 0,
              val_answers: torch.Tensor | None = None) -> dict:
    """A ``Linear(d_in, num_classes, bias=False)`` (a gate's shape) fitted by AdamW on ``(x, y)`` for ``epochs``
    shuffled passes; ``{"val": accuracy on (x_val, y_val), "train": accuracy on the training tokens}``, and with
    ``val_answers`` (a bool mask of the validation tokens) ``"val_answers"`` / ``"val_prompts"``: the validation
    accuracy on the answer tokens and on the rest (None where there is none)."""
    g = torch.Generator().manual_seed(seed)
    probe = torch.nn.Linear(x.shape[1], num_classes, bias=False)
    torch.nn.init.zeros_(probe.weight)
    opt = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=0.0)
    x, x_val = x.float(), x_val.float()
    for _ in range(epochs):
        order = torch.randperm(x.shape[0], generator=g)
        for i in range(0, x.shape[0], batch):
            b = order[i:i + batch]
            loss = F.cross_entropy(probe(x[b]), y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        right = probe(x_val).argmax(-1) == y_val
        out = {"val": round(float(right.float().mean()), 4),
               "train": round(float((probe(x).argmax(-1) == y).float().mean()), 4)}
    if val_answers is not None:
        for key, where in (("val_answers", val_answers), ("val_prompts", ~val_answers)):
            out[key] = round(float(right[where].float().mean()), 4) if bool(where.any()) else None
    return out


def _record(record_dir: Path) -> tuple[dict, dict]:
    """``(composed config, metrics record)`` of a MeteoRA route run (a committed record dir or a run dir)."""
    cfg, rec = read_route_record(record_dir)
    if rec.get("stage") != "route" or not rec.get("router_accuracy_by_projection"):
        raise ValueError(f"{record_dir}: not a MeteoRA route record with per-projection accuracies")
    return cfg, rec


def parse_layers(spec: str, num_layers: int) -> list[int]:
    """``"0,3,last"`` -> ``[0, 3, num_layers - 1]`` (sorted, unique); a layer outside the model is an error."""
    out = set()
    for part in spec.split(","):
        part = part.strip()
        i = num_layers - 1 if part == "last" else int(part) if part.lstrip("-").isdigit() else None
        if i is None or not 0 <= i < num_layers:
            raise ValueError(f"--layers {spec!r}: {part!r} is not a layer of this {num_layers}-layer model "
                             f"(give 0..{num_layers - 1} or 'last', comma-separated)")
        out.add(i)
    return sorted(out)


def gate_probe(record_dir, per_task: int = 60, layers: str = DEFAULT_LAYERS, model_path: str | None = None,
               epochs: int = 15, seed: int = 0) -> dict:
    """The probe document of one route record (see the module docstring)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from data.assets import local_model_dir
    from data.batches import routed_rows, routed_rows_settings

    provenance = {"git_sha": git_sha(), "device": device_name(), "versions": versions(), "seed": seed,
                  "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}  # the code as it starts
    record_dir = Path(record_dir)
    cfg, rec = _record(record_dir)
    path = model_path or str(local_model_dir(cfg["model"]["name_or_path"]))
    chosen = parse_layers(layers, AutoConfig.from_pretrained(path).num_hidden_layers)  # before anything heavy
    tokenizer = AutoTokenizer.from_pretrained(path)
    settings = routed_rows_settings(cfg, tokenizer, prompt_only=False)
    train = routed_rows(split=str(cfg["data"]["train_split"]), per_task=per_task, **settings)
    val = routed_rows(split=str(cfg["data"]["val_split"]), per_task=int(cfg["router"]["train"]["val_rows_per_task"]),
                      **settings)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    hf_logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()
    x_train, y_train, train_answers = projection_inputs(model, train, chosen)
    x_val, y_val, val_answers = projection_inputs(model, val, chosen)
    num_classes = len(rec["adapters"])
    gates = rec["router_accuracy_by_projection"]
    rows = []
    # the answer-only probe takes as many optimizer steps as the whole-row one: more passes over fewer tokens
    answer_epochs = epochs * max(1, round(len(y_train) / max(int(train_answers.sum()), 1)))
    for i in chosen:
        probe = fit_probe(x_train[i], y_train, x_val[i], y_val, num_classes, epochs=epochs, seed=seed,
                          val_answers=val_answers)
        rows.append({"layer": i, "probe_val": probe["val"], "probe_train": probe["train"],
                     "probe_val_answers": probe["val_answers"], "probe_val_prompts": probe["val_prompts"],
                     "gate_q_proj": gates.get(f"model__layers__{i}__self_attn__q_proj")})
        if train_answers.any() and val_answers.any():  # could a gate that learned the answers alone route them?
            own = fit_probe(x_train[i][train_answers], y_train[train_answers], x_val[i][val_answers],
                            y_val[val_answers], num_classes, epochs=answer_epochs, seed=seed)
            rows[-1].update(probe_answers_fit=own["val"], probe_answers_fit_train=own["train"])
    target = rec.get("target_accuracy")
    best = max(r["probe_val"] for r in rows)
    return {"provenance": provenance,
            "record": {"dir": str(record_dir), "git_sha": rec["provenance"]["git_sha"],
                       "router_accuracy": rec["metrics"].get("router_accuracy"), "steps": rec["metrics"].get("steps"),
                       "target_accuracy": target, "model": cfg["model"]["name_or_path"]},
            "setting": {"per_task": per_task, "train_rows": len(train), "train_tokens": int(y_train.numel()),
                        "val_rows": len(val), "val_tokens": int(y_val.numel()),
                        "val_answer_tokens": int(val_answers.sum()), "epochs": epochs,
                        "projection": "self_attn.q_proj input (= k_proj, v_proj)", "adapters": num_classes},
            "rows": rows,
            "pooled_probe": _mean((r["probe_val"] for r in rows), digits=4),
            "pooled_probe_answers": _mean((r["probe_val_answers"] for r in rows), digits=4),
            "best_probe": best,
            "best_probe_answers": max((r["probe_val_answers"] for r in rows if r["probe_val_answers"] is not None),
                                      default=None),
            "best_probe_answers_fit": max((r["probe_answers_fit"] for r in rows if r.get("probe_answers_fit")
                                           is not None), default=None),
            "best_probe_reaches_target": None if target is None else best >= float(target)}


def markdown(doc: dict) -> str:
    p, r, s = doc["provenance"], doc["record"], doc["setting"]
    lines = ["# gate_probe: per-layer linear probes beside MeteoRA's gates", "",
             (f"Written by `python -m pipeline.report.gate_probe {r['dir']} --per-task {s['per_task']}` at git "
             f"`{p['git_sha']}` on {p['device']}, {p['date']}; torch {p['versions'].get('torch')}, transformers "
             f"{p['versions'].get('transformers')}."),
             (f"Route record: `{r['dir']}` (git `{r['git_sha']}`): gates at {r['router_accuracy']:.4f} validation "
             f"token routing accuracy after {r['steps']} steps; target {r['target_accuracy']}."),
             (f"Probes: a `Linear(d_in, {s['adapters']})` per layer on the {s['projection']} of the base model "
             f"(no adapters), AdamW, {s['epochs']} passes over {s['train_tokens']:,} tokens of {s['train_rows']} "
             f"training rows; scored on the record's own {s['val_rows']} validation rows ({s['val_tokens']:,} "
             f"tokens" + (f", {s['val_answer_tokens']:,} of them answer tokens" if "val_answer_tokens" in s else "")
             + ")."), ""]
    spans = "probe_val_answers" in doc["rows"][0]
    fit = "probe_answers_fit" in doc["rows"][0]
    head = ["layer", "probe (validation)", *(("on answer tokens", "on prompt tokens") if spans else ()),
            *(("fitted on answers alone (answer tokens)",) if fit else ()), "probe (training tokens)",
            "the gates' q_proj (validation)"]
    lines += ["| " + " | ".join(head) + " |", "| " + " | ".join("---" for _ in head) + " |"]
    for row in doc["rows"]:
        cells = [row["layer"], row["probe_val"], *((row["probe_val_answers"], row["probe_val_prompts"]) if spans
                                                   else ()), *((row["probe_answers_fit"],) if fit else ()),
                 row["probe_train"], row["gate_q_proj"]]
        lines.append("| " + " | ".join("-" if c is None else str(c) if isinstance(c, int) else f"{c:.4f}"
                                       for c in cells) + " |")
    reach = doc["best_probe_reaches_target"]
    verdict = ("no target in the record" if reach is None else
               "reaches the target" if reach else "falls short of the target")
    lines += ["", (f"Mean of the probes over these layers: {doc['pooled_probe']:.4f}. Best layer's probe: "
                  f"{doc['best_probe']:.4f}: {verdict} ({r['target_accuracy']}).")]
    if doc.get("best_probe_answers") is not None:
        lines.append(f"On the answer tokens alone (what a gate routes while the model writes): mean of the probes "
                     f"{doc['pooled_probe_answers']:.4f}, best layer's {doc['best_probe_answers']:.4f}.")
    if doc.get("best_probe_answers_fit") is not None:
        lines.append(f"A probe fitted on the training rows' answer tokens alone (as many steps, more passes), scored "
                     f"on the validation answers: best layer's {doc['best_probe_answers_fit']:.4f}.")
    lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = ArgumentParser(prog="python -m pipeline.report.gate_probe", description=__doc__.splitlines()[0])
    ap.add_argument("record", help="a MeteoRA route record dir (config.yaml.xz + metrics.json.xz)")
    ap.add_argument("--per-task", type=int, default=60, help="training rows per task for the probes")
    ap.add_argument("--layers", default=DEFAULT_LAYERS, help="comma-separated layer indices, 'last' for the last")
    ap.add_argument("--model", default=None, help="local dir of the record's model (default: its name_or_path)")
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--out", default="outputs/tables", help="where gate_probe.{json,md} are written")
    args = ap.parse_args(argv)
    try:
        if args.per_task < 1 or args.epochs < 1:
            raise ValueError("--per-task and --epochs must be >= 1")
        blocker = file_in_the_way(args.out)  # found now, not after minutes of forward passes
        if blocker is not None:
            raise ValueError(f"--out {args.out}: {blocker} is a file, not a directory; give a directory for "
                             f"gate_probe.json / .md")
        doc = gate_probe(args.record, args.per_task, args.layers, args.model, args.epochs)
    except ValueError as e:
        return user_error(e)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "gate_probe.json", json.dumps(doc, indent=1) + "\n")
    atomic_write_text(out / "gate_probe.md", markdown(doc))
    print(f"gate_probe: {out / 'gate_probe.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
