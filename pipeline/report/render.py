"""Render ``Table``s: Markdown, CSV, and the report's PNG figures (radar, composite bars, latency curves).

Plots use matplotlib's Agg backend (no display); every file is written atomically.
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

from common.atomic import atomic_write_bytes, atomic_write_text
from pipeline.report.tables import Table


def _cell(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.0f}"
    return str(v)


def to_markdown(table: Table) -> str:
    """GitHub-flavoured Markdown table with its title and caption."""
    lines = [f"### {table.title}", "", "| " + " | ".join(table.columns) + " |",
             "|" + "|".join(" --- " for _ in table.columns) + "|"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in table.rows]
    if table.caption:
        lines += ["", f"_{table.caption}_"]
    return "\n".join(lines) + "\n"


def to_csv(table: Table) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(table.columns)
    w.writerows([["" if c is None else c for c in row] for row in table.rows])
    return buf.getvalue()


def save_figure(fig, path) -> Path:
    """Write ``fig`` as a PNG to ``path`` atomically and close it."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    pyplot().close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def pyplot():
    """matplotlib's pyplot on the Agg backend (no display); imported on first use: matplotlib takes ~1 s to import
    and only runs that draw need it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def radar_plot(table: Table, path) -> Path | None:
    """MeteoRA-style radar: one axis per task, one polygon per strategy (the ``tasks`` table, mean row dropped)."""
    rows = [r for r in table.rows if r[0] != "mean"]
    if not rows:
        return None
    plt = pyplot()
    strategies = table.columns[1:]
    n = len(rows)
    angles = [2 * math.pi * i / n for i in range(n)] + [0.0]
    fig = plt.figure(figsize=(7, 7))
    ax = fig.add_subplot(111, polar=True)
    styles = ["-", "--", "-.", ":"]
    for j, s in enumerate(strategies):  # markers + dash styles keep identical polygons (oracle = dlp) visible
        vals = [(r[j + 1] if r[j + 1] is not None else 0.0) for r in rows]
        vals.append(vals[0])
        ax.plot(angles, vals, label=s, linewidth=1.8, linestyle=styles[j % len(styles)], marker="o",
                markersize=4 + 2 * (len(strategies) - j) / len(strategies))
        ax.fill(angles, vals, alpha=0.06)
    ax.set_xticks(angles[:-1])
    ax.set_xticklabels([r[0] for r in rows], fontsize=8)
    ax.set_title("per-task score", pad=20)
    ax.legend(loc="upper right", bbox_to_anchor=(1.3, 1.1), fontsize=8)
    return save_figure(fig, path)


def bar_plot(table: Table, path, skip=("attempts", "correct", "mean")) -> Path | None:
    """Grouped bars: rows on x, one bar per strategy (composite-n per sub-task)."""
    rows = [r for r in table.rows if r[0] not in skip]
    if not rows:
        return None
    plt = pyplot()
    strategies = table.columns[1:]
    width = 0.8 / max(1, len(strategies))
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(rows)), 4))
    for j, s in enumerate(strategies):
        xs = [i + j * width for i in range(len(rows))]
        ax.bar(xs, [(r[j + 1] or 0.0) for r in rows], width=width, label=s)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(rows))])
    ax.set_xticklabels([r[0] for r in rows], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("score")
    ax.set_ylim(bottom=0)
    ax.set_title(table.title)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def latency_plot(table: Table, path) -> Path | None:
    """DLP-LoRA-style curve: decode ms/token vs number of adapters, one line per (shape, engine, strategy)."""
    idx = {c: i for i, c in enumerate(table.columns)}
    series: dict[str, list[tuple[float, float]]] = {}
    for r in table.rows:
        if r[idx["decode_ms_per_token"]] is None or r[idx["num_adapters"]] is None:
            continue
        label = f"{r[idx['strategy']]} ({r[idx['shape']]}, {r[idx['engine']]}, b{r[idx['batch_size']]})"
        series.setdefault(label, []).append((r[idx["num_adapters"]], r[idx["decode_ms_per_token"]]))
    if not series:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ns = sorted({p[0] for label, pts in series.items() if not label.startswith("base ") for p in pts})
    for label, pts in sorted(series.items()):
        pts = sorted(pts)
        if label.startswith("base "):  # the base model has no adapters: a reference line across the plot
            ax.axhline(pts[0][1], linestyle="--", color="gray", label=label)
            continue
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    adapter_axis(ax, ns)
    ax.set_ylabel("decode ms / token")
    ax.set_title("latency vs number of adapters")
    ax.legend(fontsize=7)
    return save_figure(fig, path)


def adapter_axis(ax, ns) -> None:
    """An x axis of adapter counts: one tick per measured count, log-scaled when they span more than 8x."""
    ax.set_xlabel("number of adapters")
    if ns and max(ns) / max(min(ns), 1) > 8:
        ax.set_xscale("log")
    if ns:
        ax.set_xticks(ns)
        ax.set_xticklabels([str(n) for n in ns])


def write_table_files(table: Table, out_dir) -> dict[str, Path]:
    """``tables/<name>.md`` and ``tables/<name>.csv`` under ``out_dir``."""
    out = Path(out_dir) / "tables"
    return {"md": atomic_write_text(out / f"{table.name}.md", to_markdown(table)),
            "csv": atomic_write_text(out / f"{table.name}.csv", to_csv(table))}
