"""``make demo``: run the pipeline's stages locally on bundled sample data and say what they did.

Everything runs on this machine under ``kfp.local``: the bundled sample chat data is served by a local
HTTP server and read through a real ``http://`` URI by the real ``dataset_download`` component.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from importlib import resources
from pathlib import Path

from kfp_components.logs import configure_logging

log = logging.getLogger("kfp_components.demo")


def run_demo(output_dir: Path) -> dict:
    from kfp import local

    from kfp_components.components.dataset import dataset_download
    from kfp_components.testing.servers import http_file_server

    output_dir.mkdir(parents=True, exist_ok=True)
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(output_dir / "pipeline_root"))
    samples = resources.files("kfp_components.data.samples")
    with resources.as_file(samples) as folder, http_file_server(folder) as server:
        uri = f"{server.url}/chat.jsonl"
        log.info("demo: stage 1/1 dataset_download from %s", uri)
        task = dataset_download(data_uri=uri, train_split_ratio=0.9, seed=42)
    return {
        "data_uri": uri,
        "format": task.outputs["data_format"],
        "train_rows": task.outputs["train_rows"],
        "eval_rows": task.outputs["eval_rows"],
        "train_sha256": task.outputs["train_sha256"],
        "train_dataset": task.outputs["train_dataset"].path,
        "eval_dataset": task.outputs["eval_dataset"].path,
        "metrics": task.outputs["metrics"].path,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", type=Path, default=Path("demo-output"), help="where artifacts go")
    args = parser.parse_args(argv)
    configure_logging()
    started = time.monotonic()
    try:
        summary = run_demo(args.output_dir.resolve())
    except ModuleNotFoundError as exc:
        print(f"demo: a prerequisite is missing ({exc.name}); run `make setup` first", file=sys.stderr)
        return 2
    width = max(map(len, summary))
    print("\nDemo summary (dataset stage on bundled sample data)")
    print("-" * 72)
    for key, value in summary.items():
        print(f"{key:<{width}}  {value}")
    print("-" * 72)
    print(f"finished in {time.monotonic() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
