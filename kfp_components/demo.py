"""``make demo``: the real OSFT pipeline, end to end on this machine, on bundled data and a tiny model.

It runs ``osft_pipeline`` (the same function that compiles to ``pipelines/training/osft/pipeline.yaml``) under
``kfp.local`` with the local training backend: the dataset stage reads the bundled chat data through a real
``http://`` URI served on 127.0.0.1, OSFT trains a tiny model built locally (random weights, a tokenizer
trained here), lm-eval scores it and the base model on a bundled task, and provenance is recorded (no
registry: the address is empty). Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from importlib import resources
from pathlib import Path

from kfp_components.environment import ensure_writable_caches
from kfp_components.logs import configure_logging

log = logging.getLogger("kfp_components.demo")
#: kfp.local's full output, in the output folder.
LOG_NAME = "pipeline.log"


def run_demo(output_dir: Path) -> dict:
    from kfp import local

    from kfp_components.local_console import condensed_console
    from kfp_components.pipelines.training.osft import osft_pipeline
    from kfp_components.testing.servers import http_file_server
    from kfp_components.testing.tiny_model import tiny_model_path

    output_dir.mkdir(parents=True, exist_ok=True)
    log.info("demo: building (or reusing) a tiny Qwen2-style model")
    model = tiny_model_path("qwen2", 0, cache_dir=output_dir / "models")
    root = output_dir / "pipeline_root"
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root))
    samples = resources.files("kfp_components.data.samples")
    with resources.as_file(samples) as folder, http_file_server(folder) as server:
        uri = f"{server.url}/chat.jsonl"
        log.info("demo: running osft_pipeline on %s (full log: %s)", uri, output_dir / LOG_NAME)
        with condensed_console(output_dir / LOG_NAME, total_tasks=5):
            osft_pipeline(
                phase_01_dataset_man_data_uri=uri,
                phase_02_train_man_train_model=str(model),
                phase_02_train_man_train_batch=8,
                phase_02_train_man_train_epochs=3,
                phase_02_train_man_train_tokens=512,
                phase_02_train_opt_max_seq_len=256,
                phase_02_train_opt_learning_rate=3e-3,
                phase_02_train_opt_torch_dtype="float32",
                phase_02_train_opt_use_liger=False,
                phase_02_train_opt_backend="local",
                phase_03_eval_man_eval_tasks=["kfp_capitals"],
                phase_03_eval_opt_batch_size="8",
            )
    run_dir = max(root.iterdir(), key=lambda p: p.stat().st_mtime)
    return summarise(run_dir, uri, output_dir / LOG_NAME)


def _artifact_metadata(step_dir: Path, name: str) -> dict:
    outputs = json.loads((step_dir / "executor_output.json").read_text())
    return outputs["artifacts"][name]["artifacts"][0].get("metadata", {})


def summarise(run_dir: Path, uri: str, log_path: Path) -> dict:
    data = _artifact_metadata(run_dir / "dataset-download", "metrics")
    train = _artifact_metadata(run_dir / "train-model", "metrics")
    evaluation = _artifact_metadata(run_dir / "evaluate-model", "metrics")
    return {
        "dataset": f"{uri}: {data['rows_read']:.0f} rows, {data['train_rows']:.0f} train / "
        f"{data['eval_rows']:.0f} eval",
        "training": f"OSFT, {train['steps']:.0f} steps, loss {train['mean_loss']:.3f} (mean) -> "
        f"{train['final_loss']:.3f} (final), {train['tokens_per_second']:.0f} tokens/s",
        "evaluation": f"kfp_capitals acc {evaluation['kfp_capitals_acc']:.3f} "
        f"(base {evaluation['base_kfp_capitals_acc']:.3f}), mean retention {evaluation['mean_retention']:.3f}",
        "model": str(run_dir / "train-model" / "model"),
        "evaluation results": str(run_dir / "evaluate-model" / "results"),
        "provenance": str(run_dir / "register-model" / "provenance" / "provenance.json"),
        "registry": "skipped (no address given)",
        "full log": str(log_path),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", type=Path, default=Path("demo-output"), help="where artifacts go")
    args = parser.parse_args(argv)
    configure_logging()
    ensure_writable_caches()
    started = time.monotonic()
    try:
        summary = run_demo(args.output_dir.resolve())
    except ModuleNotFoundError as exc:
        print(f"demo: a prerequisite is missing ({exc.name}); run `make setup` first", file=sys.stderr)
        return 2
    except RuntimeError as exc:  # kfp.local: a task failed; the console showed the end of its log
        print(f"demo: {exc}; full log: {args.output_dir.resolve() / LOG_NAME}", file=sys.stderr)
        return 1
    width = max(map(len, summary))
    print("\nDemo summary: osft_pipeline under kfp.local (download -> train -> evaluate -> provenance)")
    print("-" * 96)
    for key, value in summary.items():
        print(f"{key:<{width}}  {value}")
    print("-" * 96)
    print(f"finished in {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
