"""Render what the KFP UI shows of a training step to images for docs/pipelines.md.

A short PPO run on the tiny test model (the bundled arithmetic prompts, a rule reward: the share of "a" in a
completion, which PPO learns to raise) produces the same
``metrics.jsonl`` and ``summary.json`` a training step reads; its ``curves`` HTML artifact and its ``summary``
Markdown artifact (shown as the KFP UI shows Markdown: headings, lists and tables) are rendered to PNG with a
headless Chromium (``chromium`` from the distribution's packages).

python -m pipelines.render_artifacts     # writes docs/images/training_curves.png, docs/images/training_summary.png
"""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IMAGES = ROOT / "docs" / "images"
REWARDS = """
def share_of_a(prompts, completions, **columns):
    return [text.count("a") / max(len(text), 1) for text in completions]
"""


def tiny_run(folder: Path) -> tuple[list[dict], dict]:
    """A 16-step PPO run on the tiny model: its metric records and its summary."""
    import torch

    from kfp_components.testing.tiny_model import tiny_model_path
    from kfp_components.trainer.config import TrainingConfig
    from kfp_components.trainer.train import train

    torch.set_num_threads(1)
    (folder / "rewards.py").write_text(REWARDS, encoding="utf-8")
    config = TrainingConfig(
        model_name_or_path=str(tiny_model_path("qwen2", 0)),
        data_path=str(ROOT / "examples" / "arithmetic_prompts.jsonl"),
        output_dir=str(folder / "out"),
        algorithm="ppo",
        reward_functions=[f"{folder / 'rewards.py'}:share_of_a"],
        num_generations=4,
        effective_batch_size=16,
        max_new_tokens=8,
        max_seq_len=256,
        max_tokens_per_gpu=1024,
        learning_rate=5e-2,
        value_learning_rate=1e-2,
        lr_scheduler="constant",
        kl_coef=0.01,
        max_steps=16,
        torch_dtype="float32",
        save_final_model=False,
        checkpoint_every_steps=0,
        report_to=[],
        seed=3,
    )
    config.validate()
    train(config)
    out = folder / "out"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return records, json.loads((out / "summary.json").read_text())


def markdown_page(text: str) -> str:
    """The subset of Markdown the summaries use (headings, bullet lines, tables) as an HTML page."""
    lines = text.splitlines()
    body: list[str] = []
    table: list[str] = []

    def flush() -> None:
        if not table:
            return
        rows = [
            [cell.strip() for cell in row.strip("|").split(" | ")]
            for row in table
            if not re.match(r"^\|[ :|]*-[-:| ]*\|$", row)
        ]
        head, *rest = rows
        body.append(
            "<table><tr>"
            + "".join(f"<th>{inline(c)}</th>" for c in head)
            + "</tr>"
            + "".join("<tr>" + "".join(f"<td>{inline(c)}</td>" for c in row) + "</tr>" for row in rest)
            + "</table>"
        )
        table.clear()

    def inline(value: str) -> str:
        value = html.escape(value.replace("\\|", "|"))
        return re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", re.sub(r"`(.+?)`", r"<code>\1</code>", value))

    for line in lines:
        if line.startswith("|"):
            table.append(line)
            continue
        flush()
        if line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            body.append(f"<h{level}>{inline(line.lstrip('#').strip())}</h{level}>")
        elif line.startswith("- "):
            body.append(f"<li>{inline(line[2:])}</li>")
        elif line.strip():
            body.append(f"<p>{inline(line)}</p>")
    flush()
    style = (
        "body{font-family:sans-serif;margin:16px;font-size:14px}table{border-collapse:collapse;margin:8px 0}"
        "th,td{border:1px solid #ccc;padding:3px 8px}td{text-align:right}td:first-child{text-align:left}"
    )
    return f'<!DOCTYPE html><html><head><meta charset="utf-8"><style>{style}</style></head><body>{"".join(body)}</body></html>'


def screenshot(page: Path, image: Path, width: int, height: int) -> None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        raise SystemExit("chromium is not installed (apt-get install chromium)")
    subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
         f"--screenshot={image}", f"--window-size={width},{height}", page.as_uri()],
        check=True,
        capture_output=True,
    )  # fmt: skip


def main() -> None:
    from kfp_components.launch.report import training_curves_html, training_summary_markdown

    IMAGES.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="kfp-artifacts-") as scratch:
        folder = Path(scratch)
        records, summary = tiny_run(folder)
        curves = folder / "curves.html"
        curves.write_text(training_curves_html(records, "Training curves: ppo"), encoding="utf-8")
        screenshot(curves, IMAGES / "training_curves.png", 900, 1500)
        page = folder / "summary.html"
        page.write_text(
            markdown_page(
                training_summary_markdown(
                    summary, {"model": "the tiny test model", "data": "examples/arithmetic_prompts.jsonl"}
                )
            ),
            encoding="utf-8",
        )
        screenshot(page, IMAGES / "training_summary.png", 700, 900)
    print(f"wrote {IMAGES / 'training_curves.png'} and {IMAGES / 'training_summary.png'}")


if __name__ == "__main__":
    main()
