"""Entry points of the training engine.

* ``python -m kfp_components.trainer --config run.yaml [--learning_rate 2e-5 ...]``, also under
  ``torchrun --nproc_per_node N -m kfp_components.trainer ...``: the image's entry point and what a
  TrainJob runs.
* ``fnsft-train --model_name_or_path M --dataset_name_or_path D --output_dir O``: plain SFT from any dataset
  URI the dataset stage reads (hf://, s3://, https://, pvc://, a path), validated before training.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path

from kfp_components.cli_args import add_config_arguments, config_from_args
from kfp_components.environment import ensure_writable_caches
from kfp_components.locking import hold_folder_lock
from kfp_components.logs import configure_logging
from kfp_components.trainer.config import TrainingConfig
from kfp_components.trainer.stopping import TrainingInterrupted
from kfp_components.typed_config import ConfigError

log = logging.getLogger("kfp_components.trainer")


def build_training_config(argv: list[str] | None = None) -> tuple[TrainingConfig, argparse.Namespace]:
    parser = argparse.ArgumentParser(
        prog="python -m kfp_components.trainer",
        description="Train with SFT (full or LoRA), OSFT or DPO; run under torchrun for several processes.",
    )
    parser.add_argument("--config", help="YAML file of TrainingConfig options; flags override it")
    parser.add_argument("--log_level", default="INFO")
    add_config_arguments(parser, TrainingConfig)
    args = parser.parse_args(argv)
    return config_from_args(TrainingConfig, args), args


def main(argv: list[str] | None = None) -> int:
    """Train; a bad option or input (missing data, unknown model, an output_dir another run holds, ...) is
    one ``error: key: ...`` line and exit code 2; a run stopped by SIGINT or SIGTERM is one ``stopped: ...``
    line and exit code 130 or 143."""
    try:
        config, args = build_training_config(argv)
        configure_logging(args.log_level)
        ensure_writable_caches()
        from kfp_components.trainer.train import train

        train(config)
    except KeyboardInterrupt as exc:  # a second Ctrl-C: the ranks are not in step, leave at once
        return stopped(exc)
    except ConfigError as exc:
        code = input_error(exc)
    except TrainingInterrupted as exc:
        code = stopped(exc)
    else:
        code = 0
    leave_process_group()  # after rank 0 has said why: every rank ends the same way
    return code


def leave_process_group() -> None:
    """Leave torchrun's process group in order (see ``distributed.leave_process_group``), if one was joined."""
    if "torch.distributed" in sys.modules:
        from kfp_components.trainer.distributed import leave_process_group as leave

        leave()


def input_error(error: Exception) -> int:
    """Print ``error: ...`` (once, from rank 0 under torchrun) and return exit code 2."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"error: {error}", file=sys.stderr)
    return 2


def stopped(error: TrainingInterrupted | KeyboardInterrupt) -> int:
    """Print ``stopped: ...`` (once, from rank 0) and return the shell's exit code for the signal."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"stopped: {error or 'interrupted (SIGINT)'}", file=sys.stderr)
    return error.exit_code if isinstance(error, TrainingInterrupted) else 128 + signal.SIGINT


#: Where ``fnsft-train`` writes when neither a flag nor the config file names an output_dir.
FNSFT_TRAIN_OUTPUT_DIR = "outputs/fnsft-train"


def fnsft_train_main(argv: list[str] | None = None) -> int:
    """Plain SFT from a dataset URI: validate and split the data, then train (into --output_dir, default
    ./outputs/fnsft-train)."""
    parser = argparse.ArgumentParser(prog="fnsft-train", description=fnsft_train_main.__doc__)
    parser.add_argument(
        "--dataset_name_or_path",
        required=True,
        help="hf://org/name, s3://bucket/key, https://..., pvc://claim/path or a local path; several mix: "
        "'uri_a:0.7,uri_b:0.3' (weights) or 'uri_a:5000,uri_b:1000' (rows)",
    )
    parser.add_argument(
        "--dataset_source_format",
        default="auto",
        help="format of the rows given: auto, messages, conversations, sharegpt, alpaca, prompt_completion, "
        "text, preference, implicit_preference or prompt",
    )
    parser.add_argument(
        "--dataset_field_map", default="", help="rename the file's columns first: 'question:prompt,...'"
    )
    parser.add_argument("--config", help="YAML file of TrainingConfig options; flags override it")
    parser.add_argument("--log_level", default="INFO")
    add_config_arguments(parser, TrainingConfig, skip=("data_path", "algorithm"))
    args = parser.parse_args(argv)
    configure_logging(args.log_level)
    ensure_writable_caches()
    try:
        # data_path is the prepared file, known once the dataset stage has run below
        config = config_from_args(
            TrainingConfig,
            args,
            defaults={"output_dir": FNSFT_TRAIN_OUTPUT_DIR},
            algorithm="sft",
            data_path="<prepared dataset>",
        )
        log.info("output_dir: %s", Path(config.output_dir).resolve())
        check_model(config)  # before fetching the data
    except ConfigError as exc:
        return input_error(exc)
    from kfp_components.data import DatasetConfig, DatasetError, prepare_dataset
    from kfp_components.trainer.train import train
    from kfp_components.typed_config import from_dict

    prepared_dir = Path(config.output_dir) / "data"
    try:
        # the output folder is this run's from before the data is written into it until training ends
        with hold_folder_lock(config.output_dir, purpose="fnsft-train"):
            dataset = from_dict(
                DatasetConfig,
                {
                    "dataset_name_or_path": args.dataset_name_or_path,
                    "dataset_source_format": args.dataset_source_format,
                    "dataset_field_map": args.dataset_field_map,
                    "train_split_ratio": 1.0,
                    "data_format": config.data_format,
                },
            )
            prepared = prepare_dataset(
                dataset,
                prepared_dir / "train.jsonl",
                prepared_dir / "eval.jsonl",
            )
            config.data_path = str(prepared.train_path)
            train(config)
    except (DatasetError, ConfigError) as exc:
        return input_error(exc)
    except (TrainingInterrupted, KeyboardInterrupt) as exc:
        return stopped(exc)
    return 0


def check_model(config: TrainingConfig) -> None:
    """The preflight checks of the model alone (reference, tokenizer, targets)."""
    from kfp_components.trainer.preflight import model_problems

    problems = model_problems(config)
    if problems:
        raise ConfigError.of(problems)
