"""What the KFP UI shows of a training step: the curves page is well-formed HTML with every point of every
metric and nothing from the network; the Markdown summary has the run's numbers. A real local training step
hands its metrics.jsonl over before its scratch folder goes."""

from __future__ import annotations

import re
from html.parser import HTMLParser

import pytest

from kfp_components.launch.report import (
    charts_of,
    metric_series,
    training_curves_html,
    training_summary_markdown,
    write_training_report,
)
from kfp_components.launch.step import run_train_model_step
from kfp_components.testing.tiny_model import tiny_model_path

from conftest import SAMPLES

VOID = {"meta", "br", "hr", "img", "input", "link", "rect", "line", "circle", "polyline", "path"}


class Page(HTMLParser):
    """Checks nesting; collects the tags, attributes, and each section's title and table."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.tags: list[str] = []
        self.attributes: list[str] = []
        self.tables: dict[str, list[list[str]]] = {}
        self.text: list[str] = []
        self._section = ""
        self._in: str = ""
        self._row: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.attributes += [f"{k}={v}" for k, v in attrs]
        if tag not in VOID:
            self.stack.append(tag)
        if tag in ("h2", "td", "th"):
            self._in, self.text = tag, []
        if tag == "tr":
            self._row = []

    def handle_startendtag(self, tag, attrs):
        self.tags.append(tag)
        self.attributes += [f"{k}={v}" for k, v in attrs]

    def handle_endtag(self, tag):
        if tag in VOID:
            return
        assert self.stack and self.stack[-1] == tag, f"</{tag}> closes <{self.stack[-1:]}>"
        self.stack.pop()
        if tag == "h2":
            self._section = "".join(self.text)
            self.tables[self._section] = []
        elif tag in ("td", "th") and self._row is not None:
            self._row.append("".join(self.text))
        elif tag == "tr" and self._row is not None and self._section:
            self.tables[self._section].append(self._row)
            self._row = None
        self._in = ""

    def handle_data(self, data):
        if self._in:
            self.text.append(data)


def parse(page: str) -> Page:
    parser = Page()
    parser.feed(page)
    parser.close()
    assert parser.stack == ["html"] or parser.stack == [], parser.stack
    return parser


def assert_self_contained(page: str, parsed: Page) -> None:
    assert not re.search(r"(https?:)?//[\w.-]+\.\w", page), "no URL of any host"
    assert not {"script", "link", "img", "iframe", "object", "embed"} & set(parsed.tags)
    assert not [a for a in parsed.attributes if a.split("=")[0] in ("src", "href", "xlink:href")]
    assert "url(" not in page and "@import" not in page


def assert_every_point_is_in_its_table(records, parsed: Page) -> None:
    series = metric_series(records)
    charts = charts_of(series)
    assert [title for title, _ in charts] == list(parsed.tables)
    for title, names in charts:
        header, *rows = parsed.tables[title]
        assert header == ["step", *names]
        for column, name in enumerate(names, 1):
            shown = [(int(row[0]), float(row[column])) for row in rows if row[column]]
            assert shown == [(s, pytest.approx(v, rel=1e-5)) for s, v in series[name]], name


ONLINE = [
    {
        "step": step,
        "epoch": 0,
        "loss": 0.5 / step,
        "lr": 1e-5,
        "grad_norm": None,
        "reward": 0.1 * step,
        "reward/exact/mean": 0.05 * step,
        "kl": 0.01 * step,
        "tokens_per_second": 1000.0 + step,
        "step_skipped": False,
    }
    for step in (1, 2, 3)
]
DPO = [
    {
        "step": 1,
        "loss": 0.69,
        "lr": 1e-6,
        "reward_accuracy": 0.5,
        "implicit_kl": 0.0,
        "tokens_per_second": 9.0,
    },
    {
        "step": 2,
        "loss": 0.6,
        "lr": 1e-6,
        "reward_accuracy": 0.75,
        "implicit_kl": 0.02,
        "tokens_per_second": 9.5,
    },
    {"step": 2, "epoch": 0, "eval_loss": 0.65},
]


@pytest.mark.parametrize(
    ("records", "charts"),
    [
        (ONLINE, ["Loss", "Reward", "KL", "Learning rate", "Tokens/s"]),
        (DPO, ["Loss", "KL", "Accuracy", "Learning rate", "Tokens/s"]),
    ],
)
def test_curves_page_has_a_chart_per_quantity_and_every_point(records, charts):
    page = training_curves_html(records)
    parsed = parse(page)
    assert_self_contained(page, parsed)
    assert list(parsed.tables) == charts
    assert_every_point_is_in_its_table(records, parsed)
    assert parsed.tags.count("svg") == len(charts)
    assert "reward/exact/mean" in parsed.tables.get("Reward", [["", "", "reward/exact/mean"]])[0]


def test_a_long_run_draws_lines_without_a_marker_per_point():
    records = [{"step": s, "loss": 1 / s} for s in range(1, 2001)]
    parsed = parse(training_curves_html(records))
    assert "circle" not in parsed.tags and "polyline" in parsed.tags
    assert len(parsed.tables["Loss"]) == 2001


def test_a_run_without_metrics_says_so():
    assert "No metrics were recorded" in training_curves_html([])


def test_summary_markdown_has_the_numbers():
    summary = {
        "algorithm": "grpo",
        "steps": 3,
        "epochs": 1,
        "final_loss": 0.1667,
        "mean_loss": 0.3056,
        "tokens_per_second": 1002.5,
        "duration_seconds": 90.0,
        "samples_seen": 24,
        "tokens_seen": 3000,
        "world_size": 2,
        "eval_loss": None,
        "eval_history": [],
        "metrics": {"reward": 0.3, "kl": 0.03, "reward/exact/mean": 0.15},
        "attempts": 2,
    }
    text = training_summary_markdown(summary, {"model": "Qwen/Qwen2.5-0.5B"})
    for expected in (
        "| algorithm | grpo |",
        "| steps | 3 |",
        "| final loss | 0.1667 |",
        "| mean loss | 0.3056 |",
        "| tokens/s | 1002.5 |",
        "| duration | 90.0 s (1.5 min) |",
        "| attempts | 2 |",
        "| reward | 0.3 |",
        "| kl | 0.03 |",
        "| reward/exact/mean | 0.15 |",
        "- **model**: Qwen/Qwen2.5-0.5B",
    ):
        assert expected in text
    assert "eval loss" not in text


def test_a_local_training_step_reports_its_curves_and_summary(tmp_path):
    eval_rows = tmp_path / "eval.jsonl"
    eval_rows.write_text("".join((SAMPLES / "chat.jsonl").read_text().splitlines(keepends=True)[:4]))
    result = run_train_model_step(
        train_data=SAMPLES / "chat.jsonl",
        eval_data=eval_rows,
        model_dir=tmp_path / "artifacts" / "model",
        backend="local",
        options={
            "model_name_or_path": str(tiny_model_path("qwen2", 0)),
            "algorithm": "sft",
            "torch_dtype": "float32",
            "max_seq_len": 256,
            "effective_batch_size": 8,
            "max_tokens_per_gpu": 512,
            "max_steps": 3,
            "eval_steps": 2,
        },
        training_options={},
        trainjob_options={},
        stage="train-sft",
        run_id="r7",
    )
    assert [r["step"] for r in result.metrics if "loss" in r] == [1, 2, 3]
    assert [r["step"] for r in result.metrics if "eval_loss" in r] == [2, 3]
    assert result.config["run_name"] == "r7-train-sft"
    write_training_report(
        result,
        curves_path=tmp_path / "curves.html",
        summary_path=tmp_path / "summary.md",
        model_name_or_path="https://user:secret@example.com/model",
    )
    page = (tmp_path / "curves.html").read_text()
    parsed = parse(page)
    assert list(parsed.tables) == ["Loss", "Learning rate", "Tokens/s"]
    assert parsed.tables["Loss"][0] == ["step", "loss", "eval_loss"]
    assert_every_point_is_in_its_table(result.metrics, parsed)
    summary = (tmp_path / "summary.md").read_text()
    assert f"| final loss | {result.summary['final_loss']:.6g} |" in summary
    assert f"| eval loss | {result.summary['eval_loss']:.6g} |" in summary
    assert "| steps | 3 |" in summary and "secret" not in summary
