"""The TRL side of the PPO benchmark: one ``trl.experimental.ppo.PPOTrainer`` run, timed per step.

Run by ``benchmarks/ppo.py`` in a separate virtual environment that has TRL 1.12 (the last TRL with a PPO
trainer; it is not a dependency of this project), so it imports nothing from the project::

    /work/scratch-trl-ppo/bin/python benchmarks/ppo_trl.py JOB.json

``JOB.json`` holds ``model`` (the policy, a local folder), ``reward_model`` (a local
``AutoModelForSequenceClassification`` folder, which also initialises the value model, as TRL's own PPO
example does), ``prompts`` (JSONL of ``{"prompt", "answer"}`` rows), ``ppo_config`` (keyword arguments of
``PPOConfig``, mapped from the benchmark's options by ``benchmarks.ppo.trl_arguments``), ``output`` (where
the result JSON goes), ``torch_threads`` and ``reward_input``: ``token_ids`` (TRL's own ``get_reward``, the
default) or ``conversation`` (TRL's ``get_reward`` reads the reward model's score of the conversation
rendered with the chat template, as the project's trainer does; the value model's values stay TRL's).

Timing: ``PPOTrainer.train`` is one function with no step-begin callback, so a step is the time from the
previous ``on_step_end`` (the first: ``on_train_begin``) to its own ``on_step_end``: the whole loop body
(rollout, the reference, value and reward forward passes, GAE, the PPO epochs, logging), and the previous
step's clean-up after its callback. Generation is the module-level ``batch_generation`` (its
``model.generate``), wrapped in place; it also counts the completion tokens (up to each row's first pad).
Update is step minus generation.

Scores: TRL scores the prompt's and the completion's token ids as they are; the project's trainer renders
prompt and completion as a conversation (the chat template's end-of-turn after the completion included), as
the reward model was trained. So that the curves compare, each batch is also scored the project's way
(``score``: the same reward model on the rendered conversation, less ``missing_eos_penalty`` as TRL applies
it) right after generation, its time taken out of the step; TRL's own ``objective/scores`` (what it trains
on) is kept as ``trl_score``, with ``objective/kl`` (per completion) and ``loss/value_avg``. The whole run,
from loading the models to the end of training, is timed in wall-clock and CPU seconds (the extra scoring
included there).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any


def _end(response: list[int], eos: int, pad: int) -> int:
    """The completion's length as TRL sees it: up to and including its first EOS, or up to its first pad."""
    for index, token in enumerate(response):
        if token == eos:
            return index + 1
        if token == pad:
            return index
    return len(response)


def main(job_path: str) -> None:
    import datasets
    import torch
    import transformers
    import trl
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
        TrainerCallback,
    )
    from trl.experimental.ppo import PPOConfig, PPOTrainer, ppo_trainer

    job = json.loads(Path(job_path).read_text())
    torch.set_num_threads(job["torch_threads"])
    started, cpu_started = time.perf_counter(), time.process_time()

    timing: dict[str, float] = {"generation_seconds": 0.0, "completion_tokens": 0, "outside_seconds": 0.0}
    scores: list[float] = []
    generate = ppo_trainer.batch_generation

    def timed_generation(model: Any, queries: Any, batch_size: int, pad_token_id: int, config: Any) -> Any:
        begun = time.perf_counter()
        query_responses, logits = generate(model, queries, batch_size, pad_token_id, config)
        ended = time.perf_counter()
        timing["generation_seconds"] += ended - begun
        responses = query_responses[:, queries.shape[1] :]
        ends = [_end(row, tokenizer.eos_token_id, pad_token_id) for row in responses.tolist()]
        timing["completion_tokens"] += sum(ends)
        scores.extend(rendered_scores(queries.tolist(), responses.tolist(), ends, pad_token_id))
        timing["outside_seconds"] += time.perf_counter() - ended
        return query_responses, logits

    def rendered_scores(
        queries: list[list[int]], responses: list[list[int]], ends: list[int], pad: int
    ) -> list[float]:
        """The reward model's score of each completion as the project's trainer computes it (prompt and
        completion text rendered as a conversation), less the missing-EOS penalty as TRL applies it; for the
        comparable score curve (TRL trains on its own ``get_reward`` scores unless ``reward_input`` is
        ``conversation``), outside the step's time."""
        penalties = [
            0.0
            if tokenizer.eos_token_id in response[:end]
            else job["ppo_config"].get("missing_eos_penalty") or 0.0
            for response, end in zip(responses, ends, strict=True)
        ]
        values = conversation_scores(queries, responses, ends, pad)
        return [value - penalty for value, penalty in zip(values, penalties, strict=True)]

    def conversation_scores(
        queries: list[list[int]], responses: list[list[int]], ends: list[int], pad: int
    ) -> list[float]:
        """The reward model's score of each prompt and completion rendered as a conversation (the
        completion's text up to ``ends``, special tokens skipped), read at its last token."""
        texts = []
        for query, response, end in zip(queries, responses, ends, strict=True):
            prompt = prompt_of[tuple(t for t in query if t != pad)]
            completion = tokenizer.decode(response[:end], skip_special_tokens=True)
            messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
            texts.append(tokenizer.apply_chat_template(messages, tokenize=False))
        encoded = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
        longest = max(len(ids) for ids in encoded)
        input_ids = torch.full((len(encoded), longest), pad, dtype=torch.long)
        attention = torch.zeros((len(encoded), longest), dtype=torch.long)
        for row, ids in enumerate(encoded):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            attention[row, : len(ids)] = 1
        with torch.no_grad():
            return scorer(input_ids=input_ids, attention_mask=attention).logits[:, 0].tolist()

    reward_of = ppo_trainer.get_reward

    def conversation_reward(
        model: Any, query_responses: Any, pad_token_id: int, context_length: int
    ) -> tuple[Any, Any, Any]:
        """``get_reward`` with the reward model's score read the project's way (the conversation rendered
        with the chat template); the value model's per-token values as TRL computes them."""
        if model is not reward_model:
            return reward_of(model, query_responses, pad_token_id, context_length)
        queries = query_responses[:, :context_length].tolist()
        responses = query_responses[:, context_length:].tolist()
        ends = [_end(row, tokenizer.eos_token_id, pad_token_id) for row in responses]
        scores = conversation_scores(queries, responses, ends, pad_token_id)
        return None, torch.tensor(scores, dtype=torch.float32, device=query_responses.device), None

    ppo_trainer.batch_generation = timed_generation  # train() looks the name up in its module
    reward_input = job.get("reward_input", "token_ids")
    if reward_input == "conversation":
        ppo_trainer.get_reward = conversation_reward
    elif reward_input != "token_ids":
        raise SystemExit(f"reward_input: {reward_input!r} is not token_ids or conversation")

    tokenizer = AutoTokenizer.from_pretrained(job["model"], padding_side="left")
    rows = [json.loads(line) for line in Path(job["prompts"]).read_text().splitlines() if line.strip()]
    # The prompt rendered with the chat template and its generation prompt, as the project's trainer does.
    prompt_of: dict[tuple[int, ...], str] = {}
    for row in rows:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": row["prompt"]}],
            add_generation_prompt=True,
            tokenize=True,
            return_dict=False,
        )
        prompt_of[tuple(ids)] = row["prompt"]
    dataset = datasets.Dataset.from_list([{"input_ids": list(ids)} for ids in prompt_of])
    policy = AutoModelForCausalLM.from_pretrained(job["model"], dtype=torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(job["model"], dtype=torch.float32)
    reward_model = AutoModelForSequenceClassification.from_pretrained(
        job["reward_model"], num_labels=1, dtype=torch.float32
    )
    value_model = AutoModelForSequenceClassification.from_pretrained(
        job["reward_model"], num_labels=1, dtype=torch.float32
    )
    scorer = AutoModelForSequenceClassification.from_pretrained(
        job["reward_model"], num_labels=1, dtype=torch.float32
    ).eval()

    steps: list[dict[str, Any]] = []
    step_logs: dict[int, dict[str, float]] = {}

    class StepTimer(TrainerCallback):
        mark = 0.0

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.mark = time.perf_counter()

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
            if logs and "objective/scores" in logs:
                step_logs[state.global_step] = dict(logs)

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            now = time.perf_counter()
            seconds = now - self.mark - timing["outside_seconds"]
            steps.append(
                {
                    "step": state.global_step,
                    "seconds": seconds,
                    "generation_seconds": timing["generation_seconds"],
                    "update_seconds": seconds - timing["generation_seconds"],
                    "completion_tokens": timing["completion_tokens"],
                }
            )
            steps[-1]["score"] = sum(scores) / len(scores) if scores else None
            timing["generation_seconds"], timing["completion_tokens"], timing["outside_seconds"] = 0.0, 0, 0.0
            scores.clear()
            self.mark = now

    trainer = PPOTrainer(
        args=PPOConfig(**job["ppo_config"]),
        processing_class=tokenizer,
        model=policy,
        ref_model=reference,
        reward_model=reward_model,
        value_model=value_model,
        train_dataset=dataset,
        eval_dataset=dataset.select(range(min(len(dataset), 8))),
        callbacks=[StepTimer()],
    )
    trainer.train()
    run_seconds, run_cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    for step in steps:
        log = step_logs.get(step["step"], {})
        step["trl_score"] = log.get("objective/scores")
        step["kl_per_completion"] = log.get("objective/kl")
        step["value_loss"] = log.get("loss/value_avg")
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
