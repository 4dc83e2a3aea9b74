"""What the KFP UI shows of a training step: the curves of its ``metrics.jsonl`` as a self-contained HTML page
(inline SVG drawn here: no script, style sheet, font or image from anywhere), and a Markdown summary.

The page has one chart per quantity the algorithm logs: loss (with the eval loss points), reward (the mean and
each reward function's), KL, accuracy, learning rate and tokens/s; a chart whose metrics the run does not
have is left out. Every plotted point is also in a table under its chart, so the numbers can be read and
copied.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from kfp_components.trainer.tracking import scalars_of

#: The charts: title and the metrics drawn in it (the ``reward/<name>/mean`` of each reward function joins
#: the reward chart).
CHARTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("Loss", ("loss", "eval_loss")),
    ("Reward", ("reward", "score_mean")),
    ("KL", ("kl", "implicit_kl", "distill_kl", "approx_kl", "trpo_kl")),
    ("Accuracy", ("reward_accuracy", "accuracy", "eval_accuracy", "eval_reward_accuracy")),
    ("Learning rate", ("lr",)),
    ("Tokens/s", ("tokens_per_second",)),
)
COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")
WIDTH, HEIGHT, LEFT, RIGHT, TOP, BOTTOM = 720, 260, 70, 150, 20, 40
#: Points drawn as markers (with their value on hover) up to this many per series; above, the line only.
MARKERS_UP_TO = 400

Series = dict[str, list[tuple[int, float]]]


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl``; a line that is not a JSON object (a write cut short) is skipped."""
    records = []
    for line in Path(path).read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and "step" in record:
            records.append(record)
    return records


def metric_series(records: Iterable[Mapping[str, Any]]) -> Series:
    """Every finite number of the records by metric: name -> [(step, value)] in step order."""
    series: Series = {}
    for record in records:
        step = int(record["step"])
        for name, value in scalars_of(record).items():
            series.setdefault(name, []).append((step, value))
    for points in series.values():
        points.sort(key=lambda point: point[0])
    return series


def charts_of(series: Series) -> list[tuple[str, list[str]]]:
    """The charts the run has data for, each with its metrics in drawing order."""
    charts = []
    for title, names in CHARTS:
        chosen = [name for name in names if series.get(name)]
        if title == "Reward":
            chosen += sorted(n for n in series if n.startswith("reward/") and n.endswith("/mean"))
        if chosen:
            charts.append((title, chosen))
    return charts


def _number(value: float) -> str:
    return f"{value:.6g}"


def _ticks(low: float, high: float, count: int = 5) -> list[float]:
    """About ``count`` round values (1, 2 or 5 times a power of ten apart) within [low, high]."""
    if high == low:
        return [low]
    raw = (high - low) / (count - 1)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.ceil(low / step - 1e-9) * step
    ticks = []
    value = first
    while value <= high + step * 1e-9:
        ticks.append(0.0 if abs(value) < step * 1e-9 else value)
        value = first + step * len(ticks)
    return ticks


def svg_chart(title: str, series: Mapping[str, Sequence[tuple[int, float]]]) -> str:
    """One line chart as inline SVG: a polyline (and markers) per metric, axes with ticks, a legend."""
    esc = html.escape
    points = [p for values in series.values() for p in values]
    steps = [s for s, _ in points]
    values = [v for _, v in points]
    x_low, x_high = min(steps), max(steps)
    y_low, y_high = min(values), max(values)
    if y_high == y_low:
        pad = abs(y_low) * 0.05 or 1.0
        y_low, y_high = y_low - pad, y_high + pad
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def x(step: float) -> float:
        return LEFT + (0.5 if x_high == x_low else (step - x_low) / (x_high - x_low)) * plot_w

    def y(value: float) -> float:
        return TOP + (1 - (value - y_low) / (y_high - y_low)) * plot_h

    parts = [
        f'<svg width="{WIDTH}" height="{HEIGHT}" '
        f'viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-label="{esc(title)}">',
        f'<rect x="{LEFT}" y="{TOP}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#999"/>',
    ]
    for tick in _ticks(y_low, y_high):
        parts.append(
            f'<line x1="{LEFT - 4}" y1="{y(tick):.1f}" x2="{LEFT + plot_w}" y2="{y(tick):.1f}" stroke="#eee"/>'
            f'<text x="{LEFT - 6}" y="{y(tick) + 4:.1f}" font-size="11" text-anchor="end">{tick:.4g}</text>'
        )
    for tick in sorted({round(t) for t in _ticks(x_low, x_high)}):
        parts.append(
            f'<text x="{x(tick):.1f}" y="{TOP + plot_h + 16}" font-size="11" text-anchor="middle">{tick}</text>'
        )
    parts.append(
        f'<text x="{LEFT + plot_w / 2:.1f}" y="{HEIGHT - 6}" font-size="12" text-anchor="middle">step</text>'
    )
    for i, (name, data) in enumerate(series.items()):
        colour = COLOURS[i % len(COLOURS)]
        coords = " ".join(f"{x(s):.1f},{y(v):.1f}" for s, v in data)
        if len(data) > 1:
            parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="{coords}"/>')
        if len(data) <= MARKERS_UP_TO:
            parts += [
                f'<circle cx="{x(s):.1f}" cy="{y(v):.1f}" r="2.5" fill="{colour}">'
                f"<title>{esc(name)} step {s}: {_number(v)}</title></circle>"
                for s, v in data
            ]
        legend_y = TOP + 14 + 16 * i
        parts.append(
            f'<rect x="{WIDTH - RIGHT + 10}" y="{legend_y - 9}" width="10" height="10" fill="{colour}"/>'
            f'<text x="{WIDTH - RIGHT + 25}" y="{legend_y}" font-size="11">{esc(name)}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def _table(series: Mapping[str, Sequence[tuple[int, float]]]) -> str:
    names = list(series)
    steps = sorted({s for data in series.values() for s, _ in data})
    by_name = {name: dict(data) for name, data in series.items()}
    head = "<th>step</th>" + "".join(f"<th>{html.escape(n)}</th>" for n in names)
    rows = "".join(
        f"<tr><td>{step}</td>"
        + "".join(
            f"<td>{_number(by_name[n][step])}</td>" if step in by_name[n] else "<td></td>" for n in names
        )
        + "</tr>"
        for step in steps
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"


def training_curves_html(records: Sequence[Mapping[str, Any]], title: str = "Training curves") -> str:
    """The self-contained HTML page of the run's curves (see the module docstring)."""
    esc = html.escape
    series = metric_series(records)
    sections = []
    for chart, names in charts_of(series):
        chosen = {name: series[name] for name in names}
        sections.append(
            f"<section><h2>{esc(chart)}</h2>{svg_chart(chart, chosen)}"
            f"<details><summary>values</summary>{_table(chosen)}</details></section>"
        )
    body = "".join(sections) or "<p>No metrics were recorded.</p>"
    style = (
        "body{font-family:sans-serif;margin:16px}table{border-collapse:collapse;font-size:12px}"
        "th,td{border:1px solid #ccc;padding:2px 6px;text-align:right}section{margin-bottom:24px}"
    )
    return (
        f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>{esc(title)}</title>'
        f"<style>{style}</style></head><body><h1>{esc(title)}</h1>{body}</body></html>\n"
    )


def _value(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.6g}"
    return str(value)


def training_summary_markdown(summary: Mapping[str, Any], details: Mapping[str, Any] | None = None) -> str:
    """A Markdown page of a training summary (``summary.json``): the run's numbers, then the algorithm's final
    metrics (reward, KL, ... for the online algorithms; DPO's rewards), then the eval losses."""

    def cell(text: Any) -> str:
        return str(text).replace("|", "\\|").replace("\n", " ")

    duration = float(summary.get("duration_seconds", 0.0))
    rows = [
        ("algorithm", summary.get("algorithm", "")),
        ("steps", summary.get("steps", "")),
        ("epochs", summary.get("epochs", "")),
        ("final loss", _value(summary.get("final_loss", math.nan))),
        ("mean loss", _value(summary.get("mean_loss", math.nan))),
    ]
    if summary.get("eval_loss") is not None:
        rows.append(("eval loss", _value(summary["eval_loss"])))
    rows += [
        ("tokens/s", f"{float(summary.get('tokens_per_second', 0.0)):.1f}"),
        ("duration", f"{duration:.1f} s ({duration / 60:.1f} min)"),
        ("samples seen", summary.get("samples_seen", "")),
        ("tokens seen", summary.get("tokens_seen", "")),
        ("processes", summary.get("world_size", "")),
    ]
    if summary.get("attempts", 1) > 1:
        rows.append(("attempts", summary["attempts"]))
    if summary.get("skipped_steps"):
        rows.append(("skipped steps (fp16 overflow)", summary["skipped_steps"]))
    lines = ["# Training summary", ""]
    lines += [f"- **{cell(k)}**: {cell(v)}" for k, v in (details or {}).items()]
    lines += ["", "| | |", "|---|---:|"]
    lines += [f"| {cell(k)} | {cell(v)} |" for k, v in rows]
    final = {k: v for k, v in (summary.get("metrics") or {}).items() if isinstance(v, int | float)}
    if final:
        lines += ["", "## Final step's metrics", "", "| metric | value |", "|---|---:|"]
        lines += [f"| {cell(k)} | {_value(float(v))} |" for k, v in final.items()]
    history = summary.get("eval_history") or []
    if history:
        names = [k for k in history[0] if k != "step"]
        lines += ["", "## Evaluations", "", "| step | " + " | ".join(cell(n) for n in names) + " |"]
        lines.append("|---:|" + "---:|" * len(names))
        lines += [
            f"| {e.get('step', '')} | "
            + " | ".join(_value(float(e[n])) if n in e else "" for n in names)
            + " |"
            for e in history
        ]
    return "\n".join(lines) + "\n"


def write_training_report(
    result: Any, *, curves_path: str | Path, summary_path: str | Path, model_name_or_path: str = ""
) -> None:
    """Write a training step's curves (HTML) and summary (Markdown) from its
    :class:`~kfp_components.launch.step.TrainingStepResult`."""
    from kfp_components.redaction import redact_uris

    details = {"model": redact_uris(model_name_or_path)} if model_name_or_path else {}
    if result.trainjob_name:
        details["TrainJob"] = result.trainjob_name
    title = f"Training curves: {result.summary.get('algorithm', '')}".rstrip(": ")
    for path, text in (
        (curves_path, training_curves_html(result.metrics, title)),
        (summary_path, training_summary_markdown(result.summary, details)),
    ):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text, encoding="utf-8")
