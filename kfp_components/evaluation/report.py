"""The human-readable summary of an evaluation: a Markdown table (KFP Markdown artifact) and an HTML table.

One row per score: task, metric (with its filter, if any), value and stderr; with a base model the value
column reads "Tuned", beside the base value, the delta (tuned - base) and the retention (tuned / base; base /
tuned where lower is better), plus the mean retention and how many scores kept the base model's level.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from typing import Any

from kfp_components.evaluation.metrics import metric_values, retention


def _fmt(value: float | None, signed: bool = False) -> str:
    if value is None:
        return ""
    return f"{value:+.4f}" if signed else f"{value:.4f}"


def summary_rows(results: Mapping[str, Any], base: Mapping[str, Any] | None = None) -> list[list[str]]:
    """The table as text cells; the first row is the header."""
    header = ["Task", "Metric", "Value", "Stderr"]
    if base is not None:
        header = ["Task", "Metric", "Tuned", "Stderr", "Base", "Delta", "Retention"]
    rows = [header]
    base_values = {item.name: item for item in metric_values(base)} if base is not None else {}
    for item in metric_values(results):
        metric = item.metric if item.filter == "none" else f"{item.metric} ({item.filter})"
        row = [item.task, metric, _fmt(item.value), _fmt(item.stderr)]
        if base is not None:
            other = base_values.get(item.name)
            if other is None:
                row += ["", "", ""]
            else:
                ratio = retention(item.value, other.value, item.higher_is_better)
                row += [_fmt(other.value), _fmt(item.value - other.value, signed=True), _fmt(ratio)]
        rows.append(row)
    return rows


def _details(details: Mapping[str, Any]) -> list[tuple[str, str]]:
    return [(str(k), "" if v is None else str(v)) for k, v in details.items()]


def _retention_lines(rows: Sequence[Sequence[str]], mean_retention: float | None) -> list[str]:
    """``mean retention: 0.9812 (3 of 4 scores at or above the base model's)``, when there is a base."""
    if mean_retention is None or "Retention" not in rows[0]:
        return []
    column = list(rows[0]).index("Retention")
    ratios = [float(row[column]) for row in rows[1:] if row[column]]
    kept = sum(ratio >= 1.0 for ratio in ratios)
    return [
        f"mean retention: {mean_retention:.4f} ({kept} of {len(ratios)} scores at or above the base model's)"
    ]


def markdown_summary(
    rows: Sequence[Sequence[str]], details: Mapping[str, Any], mean_retention: float | None = None
) -> str:
    """A Markdown page: run details as a list, then the scores table."""

    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    lines = ["# Evaluation summary", ""]
    lines += [f"- **{cell(k)}**: {cell(v)}" for k, v in _details(details)]
    lines += [f"- **{line.replace(': ', '**: ', 1)}" for line in _retention_lines(rows, mean_retention)]
    lines += ["", "| " + " | ".join(cell(c) for c in rows[0]) + " |"]
    lines.append("|" + "|".join("---" if i < 2 else "---:" for i in range(len(rows[0]))) + "|")
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows[1:]]
    return "\n".join(lines) + "\n"


def html_summary(
    rows: Sequence[Sequence[str]], details: Mapping[str, Any], mean_retention: float | None = None
) -> str:
    """A self-contained HTML page with the same content as :func:`markdown_summary`."""
    esc = html.escape
    items = "".join(f"<li><b>{esc(k)}</b>: {esc(v)}</li>" for k, v in _details(details))
    items += "".join(
        "<li><b>{}</b>: {}</li>".format(*map(esc, line.split(": ", 1)))
        for line in _retention_lines(rows, mean_retention)
    )
    head = "".join(f"<th>{esc(c)}</th>" for c in rows[0])
    body = "".join(
        "<tr>"
        + "".join(f'<td class="{"t" if i < 2 else "n"}">{esc(c)}</td>' for i, c in enumerate(row))
        + "</tr>"
        for row in rows[1:]
    )
    style = (
        "body{font-family:sans-serif}table{border-collapse:collapse}"
        "th,td{border:1px solid #ccc;padding:4px 8px}td.n{text-align:right;font-family:monospace}"
    )
    return (
        f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>Evaluation summary</title>'
        f"<style>{style}</style></head><body><h1>Evaluation summary</h1><ul>{items}</ul>"
        f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></body></html>\n"
    )
