"""The TRL side of the GRPO benchmark: one ``GRPOTrainer`` run, timed per step.

Run by ``benchmarks/grpo.py`` in a separate virtual environment that has ``trl`` (it is not a dependency of
this project), so it imports nothing from the project::

    /work/scratch-trl/bin/python benchmarks/grpo_trl.py JOB.json

``JOB.json`` holds ``model`` (a local folder), ``prompts`` (JSONL of ``{"prompt", "answer"}`` rows),
``rewards_file`` and ``reward_functions`` (functions of that file), ``grpo_config`` (keyword arguments of
``GRPOConfig``, mapped from the benchmark's options by ``benchmarks.grpo.trl_arguments``) and ``output``
(where the result JSON goes) and ``torch_threads``.

Timing: a callback takes the wall-clock time of each optimizer step (``on_step_begin`` to ``on_step_end``);
a subclass times ``GRPOTrainer._generate_single_turn`` (the ``model.generate`` call with its padding and
EOS masking; no vLLM) and counts the completion tokens it returns, and ``_generate_and_score_completions``
(generation plus decoding, rewards, advantages and, where needed, old and reference log-probs). A step's
update time is its step time minus its generation time. Rewards come from TRL's own per-step logs
(``reward``, ``rewards/<function>/mean``). The whole run, from loading the model to the end of training, is
timed in wall-clock and in CPU seconds of the process (every thread).
"""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from pathlib import Path
from typing import Any


def _load_functions(path: str, names: list[str]) -> list[Any]:
    spec = importlib.util.spec_from_file_location("grpo_benchmark_rewards", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"cannot import reward functions from {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return [getattr(module, name) for name in names]


def main(job_path: str) -> None:
    import datasets
    import torch
    import transformers
    import trl
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    job = json.loads(Path(job_path).read_text())
    torch.set_num_threads(job["torch_threads"])
    rows = [json.loads(line) for line in Path(job["prompts"]).read_text().splitlines() if line.strip()]
    # Conversational prompts: TRL renders them with the chat template, generation prompt on, as the project's
    # trainer renders a text prompt.
    dataset = datasets.Dataset.from_list(
        [{"prompt": [{"role": "user", "content": row["prompt"]}], "answer": row["answer"]} for row in rows]
    )
    rewards = _load_functions(job["rewards_file"], job["reward_functions"])

    class TimedGRPOTrainer(GRPOTrainer):
        generation_seconds = 0.0
        rollout_seconds = 0.0
        completion_tokens = 0

        def _generate_single_turn(self, *args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            completion_ids, logprobs = super()._generate_single_turn(*args, **kwargs)
            self.generation_seconds += time.perf_counter() - started
            self.completion_tokens += sum(len(ids) for ids in completion_ids)
            return completion_ids, logprobs

        def _generate_and_score_completions(self, *args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            output = super()._generate_and_score_completions(*args, **kwargs)
            self.rollout_seconds += time.perf_counter() - started
            return output

    steps: list[dict[str, Any]] = []
    step_logs: dict[int, dict[str, float]] = {}
    started, cpu_started = time.perf_counter(), time.process_time()

    class StepTimer(TrainerCallback):
        started = 0.0

        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            trainer.generation_seconds = trainer.rollout_seconds = 0.0
            trainer.completion_tokens = 0
            self.started = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            seconds = time.perf_counter() - self.started
            steps.append(
                {
                    "step": state.global_step,
                    "seconds": seconds,
                    "generation_seconds": trainer.generation_seconds,
                    "rollout_seconds": trainer.rollout_seconds,
                    "update_seconds": seconds - trainer.generation_seconds,
                    "completion_tokens": trainer.completion_tokens,
                }
            )

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
            if logs and "reward" in logs:
                step_logs[state.global_step] = dict(logs)

    model = AutoModelForCausalLM.from_pretrained(job["model"], dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(job["model"])
    trainer = TimedGRPOTrainer(
        model=model,
        reward_funcs=rewards,
        args=GRPOConfig(**job["grpo_config"]),
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[StepTimer()],
    )
    trainer.train()
    run_seconds, run_cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    for step in steps:
        log = step_logs.get(step["step"], {})
        step["reward"] = log.get("reward")
        step["rewards"] = {
            key.split("/")[1]: value
            for key, value in log.items()
            if key.startswith("rewards/") and key.endswith("/mean")
        }
        step["completion_length"] = log.get("completions/mean_length")
    result = {
        "versions": {
            "trl": trl.__version__,
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "datasets": datasets.__version__,
        },
        "torch_threads": torch.get_num_threads(),
        "run_seconds": run_seconds,
        "run_cpu_seconds": run_cpu_seconds,
        "steps": steps,
    }
    Path(job["output"]).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(f"usage: {sys.argv[0]} JOB.json")
    main(sys.argv[1])
