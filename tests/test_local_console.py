"""The condensed console of kfp.local runs: everything to the log file, progress to the terminal."""

from __future__ import annotations

import io
import logging
import sys

from kfp_components.local_console import condensed_console

KFP_OUTPUT = """\
11:51:02.666 - INFO - Executing task \x1b[96m'dataset-download'\x1b[0m
    [KFP Executor 2026-11-21 11:51:02,758 INFO]: Got executor_input:
    {"inputs": {"parameterValues": {"dataset_name_or_path": "http://127.0.0.1:1/chat.jsonl"}}}
    [KFP Executor 2026-11-21 11:51:02,814 INFO]: dataset: messages format, 40 rows read, 0 dropped, 36 train, 4 eval
11:51:02.857 - INFO - Task \x1b[96m'dataset-download'\x1b[0m finished with status \x1b[92mSUCCESS\x1b[0m
11:51:02.860 - INFO - Executing task \x1b[96m'train-model'\x1b[0m
    [KFP Executor 2026-11-21 11:51:12,653 INFO]: 11:51:12 INFO kfp_components.trainer: step 1/15 loss 6.9292 lr 0.003
    [KFP Executor 2026-11-21 11:51:15,809 INFO]: step 12/15 loss 5.0277 lr 0.001 grad_norm 1.2 tokens/s 9000
    [KFP Executor 2026-11-21 11:51:16,000 INFO]: Traceback (most recent call last):
    [KFP Executor 2026-11-21 11:51:16,001 INFO]: ValueError: something broke
11:51:17.000 - INFO - Task \x1b[96m'train-model'\x1b[0m finished with status \x1b[91mFAILURE\x1b[0m
"""


def test_terminal_gets_stages_steps_and_the_failing_tail(tmp_path):
    terminal = io.StringIO()
    log_path = tmp_path / "run" / "pipeline.log"
    with condensed_console(log_path, total_tasks=4, terminal=terminal) as console:
        for chunk in (KFP_OUTPUT[:100], KFP_OUTPUT[100:]):  # lines split across writes
            print(chunk, end="")
        print("a warning", file=sys.stderr)
    shown = terminal.getvalue().splitlines()
    assert shown[:3] == [
        "[1/4] dataset-download",
        "      dataset: messages format, 40 rows read, 0 dropped, 36 train, 4 eval",
        "      dataset-download: success in 0 s",
    ]
    assert shown[3:6] == [
        "[2/4] train-model",
        "      step  1/15  loss 6.9292",
        "      step 12/15  loss 5.0277",
    ]
    assert shown[6] == "      train-model: failure in 0 s"
    assert any("ValueError: something broke" in line for line in shown[7:])
    assert not any("executor_input" in line or "parameterValues" in line for line in shown[:7])
    assert console.failed == ["train-model"]
    logged = log_path.read_text()
    assert KFP_OUTPUT in logged and "a warning" in logged


def test_log_handlers_are_pointed_at_the_log_and_restored(tmp_path):
    terminal, original = io.StringIO(), io.StringIO()
    handler = logging.StreamHandler(original)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        with condensed_console(tmp_path / "pipeline.log", total_tasks=1, terminal=terminal):
            root.warning("Cleaned up workspace")
        root.warning("after")
    finally:
        root.removeHandler(handler)
    assert "Cleaned up workspace" in (tmp_path / "pipeline.log").read_text()
    assert original.getvalue() == "after\n" and terminal.getvalue() == ""
