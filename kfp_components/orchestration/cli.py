"""``fnsft-pipeline`` (also ``python -m kfp_components.orchestration``): run a multi-stage pipeline YAML.

Exit status: 0 when the pipeline (or dry run) succeeded, 1 when a stage failed, 2 for a bad config, a bad
flag, or a problem found before the first stage starts (by a dry run or the run's own up-front checks: a
missing or wrongly formatted dataset, an unwritable output folder, a model that does not load, ...); errors
are printed as ``error: <message>``, every problem on its own line, without credentials.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import sys
from pathlib import Path
from typing import Any

from kfp_components.data import DatasetError
from kfp_components.environment import ensure_writable_caches
from kfp_components.logs import configure_logging
from kfp_components.orchestration.config import load_pipeline_config, parse_override
from kfp_components.orchestration.pipeline import FINAL_MODEL_DIR, Pipeline
from kfp_components.orchestration.state import PipelineError
from kfp_components.redaction import redact_text
from kfp_components.trainer.stopping import TrainingInterrupted
from kfp_components.typed_config import ConfigError, parse_cli_value

log = logging.getLogger("kfp_components.orchestration")

EPILOG = """\
examples:
  fnsft-pipeline --config examples/multistage/sft_dpo.yaml
  fnsft-pipeline --config sft_dpo.yaml --dry_run
  fnsft-pipeline --config sft_dpo.yaml --stages dpo --set stage_configs.dpo.beta=0.2
  fnsft-pipeline --config sft.yaml --model_name_or_path ./my-model --set stage_configs.sft.dataset_name_or_path=data.jsonl
  fnsft-pipeline --config wise.yaml --plugin examples/multistage/custom_stage.py
  fnsft-pipeline --config sft_dpo.yaml --compile sft_dpo_pipeline.yaml --eval_tasks arc_easy
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fnsft-pipeline",
        description="Run fine-tuning stages (sft, osft, dpo, custom) in order from one YAML file. Each stage\n"
        "starts from the model the previous stage saved; finished stages are not run again.\n"
        "Every option: docs/multistage.md.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", required=True, metavar="FILE", help="the pipeline YAML")
    parser.add_argument(
        "--stages", nargs="+", metavar="NAME", help="run only these stages (in config order; default: all)"
    )
    parser.add_argument("--model_name_or_path", metavar="MODEL", help="override model_name_or_path")
    parser.add_argument("--output_dir", metavar="DIR", help="override output_dir")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="extend",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="override any option by its dotted key path, e.g. stage_configs.sft.dataset_name_or_path=/data/chat.jsonl or "
        "stage_configs.dpo.beta=0.2 (values are YAML scalars or [lists])",
    )
    parser.add_argument(
        "--dry_run",
        action="store_true",
        help="check the config, the datasets, the model config and tokenizer; print the plan; train nothing",
    )
    parser.add_argument(
        "--compile",
        metavar="PIPELINE_YAML",
        help="compile the stages into a Kubeflow pipeline (one step per dataset and per stage) and write its "
        "YAML here, for kfp pipeline upload; train nothing",
    )
    parser.add_argument(
        "--eval_tasks",
        nargs="+",
        default=[],
        metavar="TASK",
        help="with --compile: evaluate the final model against the base model on these lm-eval tasks",
    )
    parser.add_argument(
        "--eval_every_stage",
        action="store_true",
        help="with --compile and --eval_tasks: evaluate every stage's model against the base model too",
    )
    parser.add_argument(
        "--register_as",
        default="",
        metavar="NAME",
        help="with --compile: register the final model in the Model Registry under this name",
    )
    parser.add_argument(
        "--log_level", metavar="LEVEL", help="DEBUG, INFO, WARNING or ERROR (default: the config's)"
    )
    parser.add_argument(
        "--save_final_model",
        nargs="?",
        const="true",
        default="true",
        metavar="true|false",
        help="link the last stage's model to <output_dir>/final_model (the default; --save_final_model false "
        "leaves it out)",
    )
    parser.add_argument(
        "--cleanup_intermediate",
        action="store_true",
        help="after a successful run, delete the models of every stage but the last",
    )
    parser.add_argument(
        "--plugin",
        action="extend",
        nargs="+",
        default=[],
        metavar="MODULE_OR_FILE",
        help="import a module or .py file first (it registers custom stages with Pipeline.register_stage)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        for plugin in args.plugin:
            load_plugin(plugin)
        overrides: dict[str, Any] = dict(parse_override(text) for text in args.overrides)
        for key in ("model_name_or_path", "output_dir", "log_level"):
            if getattr(args, key):
                overrides[key] = getattr(args, key)
        save_final_model = parse_cli_value(args.save_final_model)
        if not isinstance(save_final_model, bool):
            raise ConfigError("--save_final_model", f"expected true or false, got {args.save_final_model!r}")
        if args.compile:
            from kfp_components.orchestration.kfp_compile import compile_chain

            if args.stages:
                raise ConfigError(
                    "--stages", "a compiled chain has every enabled stage; set enabled: false instead"
                )
            written = compile_chain(
                args.config,
                args.compile,
                overrides,
                eval_tasks=args.eval_tasks,
                register_as=args.register_as,
                eval_every_stage=args.eval_every_stage,
            )
            print(f"compiled: {written} (kfp pipeline upload -p <name> {written})")
            return 0
        if args.eval_tasks or args.register_as or args.eval_every_stage:
            raise ConfigError("--eval_tasks", "--eval_tasks and --register_as apply to --compile")
        config = load_pipeline_config(args.config, overrides)
        configure_logging(config.log_level)
        ensure_writable_caches()
        pipeline = Pipeline(config)
        if args.dry_run:
            plan = pipeline.dry_run(args.stages)
            print(plan.format())
            print("dry run: the config, models and datasets check out; nothing was trained")
            return 0
        results = pipeline.run(
            args.stages, save_final_model=save_final_model, cleanup_intermediate=args.cleanup_intermediate
        )
    except (ConfigError, DatasetError) as exc:
        print(f"error: {redact_text(str(exc))}", file=sys.stderr)
        return 2
    except PipelineError as exc:
        print(f"error: {redact_text(str(exc))}", file=sys.stderr)
        return 1
    except TrainingInterrupted as exc:  # SIGINT/SIGTERM while a stage trained: it saved a checkpoint
        print(f"stopped: {redact_text(str(exc))}", file=sys.stderr)
        return exc.exit_code
    final = Path(config.output_dir) / FINAL_MODEL_DIR
    shown = final if save_final_model and final.is_dir() else results[-1].model_path
    print(f"pipeline finished: {' -> '.join(r.stage_name for r in results)}; final model: {shown}")
    return 0


def load_plugin(spec: str) -> None:
    """Import ``spec``: a ``.py`` file (by path) or a module name."""
    path = Path(spec)
    if path.suffix == ".py":
        if not path.is_file():
            raise ConfigError("--plugin", f"{spec}: no such file")
        name = f"kfp_components_plugin_{path.stem}"
        if name in sys.modules:
            return
        module_spec = importlib.util.spec_from_file_location(name, path)
        assert module_spec is not None and module_spec.loader is not None
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module
        module_spec.loader.exec_module(module)
        return
    try:
        importlib.import_module(spec)
    except ModuleNotFoundError as exc:
        raise ConfigError("--plugin", f"{spec}: {exc}") from None
