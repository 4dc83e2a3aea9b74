"""PPO against TRL's ``PPOTrainer``: time per step (generation and update apart) and the score curve; A2C's
and TRPO's step time relative to PPO's on the same setup.

Both trainers get the same tiny Qwen2-shaped policy as the GRPO benchmark (:data:`benchmarks.grpo.MODEL`,
random weights, built locally and saved to one folder both load), the same bundled prompts
(``examples/arithmetic_prompts.jsonl``, one completion each) and the same reward model: a tiny
``AutoModelForSequenceClassification`` trained once per benchmark run by the project's own ``algorithm:
reward_model`` from the policy's checkpoint on the bundled preference data
(``examples/arithmetic_preferences.jsonl``; held-out accuracy on ``..._eval.jsonl`` recorded), saved to a
folder both sides load. The value model starts from that reward model on both sides (TRL's PPO example does
so; ours: ``value_model_init: reward_model``). The options (:class:`PPOBenchmark`) are mapped to each side by
:func:`ours_options` and :func:`trl_arguments`; :data:`DIFFERENCES` lists what could not be made the same.
CPU, fp32, one torch thread, once per seed, the sides taking turns, each run in a fresh process.

TRL 1.16 has no PPO trainer any more; TRL 1.12.0 (``trl.experimental.ppo``) runs in its own virtual
environment, whose interpreter is ``$TRL_PPO_PYTHON`` (default ``../scratch-trl-ppo/bin/python`` next to the
repository). It reuses the packages of the GRPO benchmark's environment (``../scratch-trl``, see
``benchmarks/grpo.py``) and adds only TRL 1.12.0::

    python3.11 -m venv ../scratch-trl-ppo
    ../scratch-trl-ppo/bin/pip install --no-deps trl==1.12.0
    echo "$(realpath ../scratch-trl)/lib/python3.11/site-packages" \\
        > ../scratch-trl-ppo/lib/python3.11/site-packages/zz_scratch_trl.pth

python -m benchmarks.run ppo              # every side; results/ppo.json, docs/ppo.png, docs/performance.md
python -m benchmarks.ppo --sides trl ppo  # some sides only (the others stay "not measured")
python -m benchmarks.ppo --render-only    # plot and docs/performance.md from the stored result
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.online_bench import (
    CURVE_ENDS,
    MODEL,
    MODEL_SEED,
    PROMPTS,
    ROOT,
    argument_parser,
    curve_ends,
    goal_text,
    mean,
    number_text,
    ours_step_rows,
    plot_sides,
    plot_stored,
    ratios_text,
    render_performance,
    run_trl_job,
    seconds_text,
    side_results,
    step_times,
    store,
    summarise_side,
    take_turns,
    train_ours_fresh,
    trl_python,
)

NAME = "ppo"
PLOT = ROOT / "docs" / "ppo.png"
PREFERENCES = ROOT / "examples" / "arithmetic_preferences.jsonl"
PREFERENCES_EVAL = ROOT / "examples" / "arithmetic_preferences_eval.jsonl"
TRL_RUNNER = ROOT / "benchmarks" / "ppo_trl.py"
DEFAULT_TRL_PYTHON = ROOT.parent / "scratch-trl-ppo" / "bin" / "python"
#: TRL's PPO, then the project's value algorithms (each side of ours is its ``algorithm``).
SIDES = ("trl", "ppo", "a2c", "trpo")
OURS = ("ppo", "a2c", "trpo")
#: What could not be made the same on both sides (rendered under the table).
DIFFERENCES = (
    "The reward model's input: TRL scores the prompt's token ids followed by the completion's (cut after "
    "its first EOS) at the completion's last token; ours renders prompt and completion as a conversation "
    "with the chat template (the `<|im_end|>` and newline after the completion included), as the reward "
    "model was trained, and scores its last token. Identical completions can get different scores. The "
    "text's round trip (decode, then encode) changes most sampled token sequences of the tiny random "
    "policy, so our reward model reads other tokens than the critic (started from the same model) does; "
    "this is most of the score gap (docs/rl.md, *PPO against TRL: the score gap*). "
    "`trl_reward_input: conversation` makes TRL score the conversation as ours does.",
    "Gradient clipping: TRL's PPO loop does not clip; ours clips only when `max_grad_norm > 0`, so it is 0.",
    "One optimizer or two: TRL trains policy and value model with one AdamW over both (one loss "
    "`pg_loss + vf_coef * vf_loss`); ours gives the value model its own AdamW at the same learning rate "
    "and schedule, the same loss.",
    "Micro-batches: TRL pads each mini-batch into one batch; ours packs completions padding-free into "
    "micro-batches of `max_tokens_per_gpu` tokens (several per mini-batch, gradients accumulated).",
    "Stop tokens: TRL stops generation at the tokenizer's EOS (`<|im_end|>`) only, and treats a sampled "
    "pad token (`<|endoftext|>`) as the end of the completion; ours stops at every EOS id of the "
    "generation config (both).",
    "The value of the token after the last: TRL keeps one value position after each completion's end "
    "in its value loss (`padding_mask_p1`); ours uses the completion's own tokens.",
    "Data order: both shuffle the prompts with the run's seed, by different generators.",
    "TRL divides logits by `temperature + 1e-7`; ours by `temperature`.",
)


# ------------------------------------------------------------------------------------------------ options
@dataclasses.dataclass(frozen=True)
class PPOBenchmark:
    """The options every side runs with (names as the project's trainer spells them)."""

    #: Completions per step: one per prompt (TRL's PPO samples one completion per prompt).
    completions_per_step: int = 32
    max_new_tokens: int = 32
    temperature: float = 1.0
    learning_rate: float = 3e-3
    max_steps: int = 20
    num_iterations: int = 4
    num_mini_batches: int = 2
    kl_coef: float = 0.05
    kl_estimator: str = "k1"
    gamma: float = 1.0
    gae_lambda: float = 0.95
    epsilon: float = 0.2
    vf_coef: float = 0.1
    value_clip: float = 0.2
    missing_eos_penalty: float = 1.0
    whiten_rewards: bool = False
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    weight_decay: float = 0.0
    #: Each side runs once per seed (sampling, data order); scores are compared on their mean.
    seeds: tuple[int, ...] = (0, 1, 2)
    #: Torch threads of every side (see ``benchmarks.grpo.GRPOBenchmark.torch_threads``).
    torch_threads: int = 1
    #: Ours only: the packing budget of a micro-batch and the longest prompt + completion.
    max_tokens_per_gpu: int = 512
    max_seq_len: int = 256
    #: The reward model: ``algorithm: reward_model`` on the policy's checkpoint (as the tests train it).
    reward_model_steps: int = 12
    reward_model_batch: int = 16
    reward_model_learning_rate: float = 3e-3
    #: What TRL's reward model reads: ``token_ids`` (TRL's own: the prompt's and the completion's token ids,
    #: read at the completion's last token) or ``conversation`` (prompt and completion rendered with the chat
    #: template, as ours and as the reward model was trained; ``benchmarks/ppo_trl.py`` swaps TRL's
    #: ``get_reward`` for the reward model).
    trl_reward_input: str = "token_ids"

    def __post_init__(self) -> None:
        if self.completions_per_step % self.num_mini_batches:
            raise ValueError(
                f"num_mini_batches {self.num_mini_batches} does not split completions_per_step "
                f"{self.completions_per_step} evenly"
            )
        if self.kl_estimator not in ("k1", "k3"):
            raise ValueError(f"kl_estimator must be k1 or k3, got {self.kl_estimator!r}")
        if self.trl_reward_input not in ("token_ids", "conversation"):
            raise ValueError(
                f"trl_reward_input must be token_ids or conversation, got {self.trl_reward_input!r}"
            )


def reward_model_options(bench: PPOBenchmark, model: str, output_dir: str) -> dict[str, Any]:
    """The project trainer's options that train the benchmark's reward model (``<output_dir>/final``)."""
    return {
        "model_name_or_path": model,
        "data_path": str(PREFERENCES),
        "eval_data_path": str(PREFERENCES_EVAL),
        "output_dir": output_dir,
        "algorithm": "reward_model",
        "torch_dtype": "float32",
        "max_seq_len": 128,
        "effective_batch_size": bench.reward_model_batch,
        "max_tokens_per_gpu": 512,
        "learning_rate": bench.reward_model_learning_rate,
        "lr_scheduler": "constant",
        "max_steps": bench.reward_model_steps,
        "seed": MODEL_SEED,
        "log_every_steps": 1,
    }


#: PPO-only options left to each other algorithm's own default (a2c: one update of the whole batch,
#: vf_coef 0.5, entropy_coef 0.01; trpo: its own).
PPO_ONLY = ("num_iterations", "num_mini_batches", "vf_coef", "entropy_coef")


def ours_options(
    bench: PPOBenchmark,
    model: str,
    reward_model: str,
    data: str,
    output_dir: str,
    seed: int,
    algorithm: str = "ppo",
) -> dict[str, Any]:
    """The project trainer's options (a ``TrainingConfig`` mapping) for ``bench``, run with ``seed``."""
    options: dict[str, Any] = {
        "model_name_or_path": model,
        "data_path": data,
        "output_dir": output_dir,
        "algorithm": algorithm,
        "reward_model_path": reward_model,
        "value_model_init": "reward_model",
        "num_generations": 1,
        "effective_batch_size": bench.completions_per_step,
        "max_new_tokens": bench.max_new_tokens,
        "max_seq_len": bench.max_seq_len,
        "max_tokens_per_gpu": bench.max_tokens_per_gpu,
        "temperature": bench.temperature,
        "top_p": 1.0,
        "top_k": 0,
        "loss_aggregation": "token",
        "epsilon_low": bench.epsilon,
        "epsilon_high": bench.epsilon,
        "num_iterations": bench.num_iterations,
        "num_mini_batches": bench.num_mini_batches,
        "kl_coef": bench.kl_coef,
        "kl_in": "reward",
        "kl_estimator": bench.kl_estimator,
        "kl_target": 0.0,
        "gamma": bench.gamma,
        "gae_lambda": bench.gae_lambda,
        "vf_coef": bench.vf_coef,
        "value_clip": bench.value_clip,
        "value_learning_rate": 0.0,
        "entropy_coef": 0.0,
        "early_stop_kl": 0.0,
        "reward_clip": 0.0,
        "whiten_rewards": bench.whiten_rewards,
        "whiten_advantages": True,
        "missing_eos_penalty": bench.missing_eos_penalty,
        "mask_truncated_completions": False,
        "learning_rate": bench.learning_rate,
        "max_steps": bench.max_steps,
        "lr_scheduler": "constant",
        "warmup_steps": 0,
        "adam_beta1": bench.adam_beta1,
        "adam_beta2": bench.adam_beta2,
        "adam_epsilon": bench.adam_epsilon,
        "weight_decay": bench.weight_decay,
        "max_grad_norm": 0.0,
        "seed": seed,
        "torch_dtype": "float32",
        "log_every_steps": 1,
        "save_final_model": False,
    }
    if algorithm != "ppo":
        for name in PPO_ONLY:
            options.pop(name)
    return options


def trl_arguments(bench: PPOBenchmark, output_dir: str, seed: int) -> dict[str, Any]:
    """TRL ``PPOConfig`` keyword arguments for ``bench``: one rollout batch of ``completions_per_step``
    completions per step, generated in one ``generate`` call; ``num_iterations`` epochs of
    ``num_mini_batches`` optimizer updates each; CPU, fp32.

    TRL's batch is ``per_device_train_batch_size x gradient_accumulation_steps``, its mini-batch that over
    ``num_mini_batches``, and one optimizer update per ``gradient_accumulation_steps`` micro-batches of
    ``per_device_train_batch_size``: with accumulation 1 and the micro-batch the whole batch, each mini-batch
    is one micro-batch (the slice stops at its end) and one update, as ours. TRL counts ``total_episodes``
    (completions), so it gets ``max_steps x completions_per_step``.
    """
    return {
        "output_dir": output_dir,
        "per_device_train_batch_size": bench.completions_per_step,
        "gradient_accumulation_steps": 1,
        "local_rollout_forward_batch_size": bench.completions_per_step,
        "num_mini_batches": bench.num_mini_batches,
        "num_ppo_epochs": bench.num_iterations,
        "total_episodes": bench.max_steps * bench.completions_per_step,
        "response_length": bench.max_new_tokens,
        "stop_token": "eos",
        "temperature": bench.temperature,
        "missing_eos_penalty": bench.missing_eos_penalty,
        "kl_coef": bench.kl_coef,
        "kl_estimator": bench.kl_estimator,
        "gamma": bench.gamma,
        "lam": bench.gae_lambda,
        "cliprange": bench.epsilon,
        "cliprange_value": bench.value_clip,
        "vf_coef": bench.vf_coef,
        "whiten_rewards": bench.whiten_rewards,
        "learning_rate": bench.learning_rate,
        "lr_scheduler_type": "constant",
        "warmup_steps": 0,
        "adam_beta1": bench.adam_beta1,
        "adam_beta2": bench.adam_beta2,
        "adam_epsilon": bench.adam_epsilon,
        "weight_decay": bench.weight_decay,
        "seed": seed,
        "use_cpu": True,
        "bf16": False,
        "fp16": False,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "disable_tqdm": True,
        "num_sample_generations": 0,
        "dataloader_num_workers": 0,
    }


# ------------------------------------------------------------------------------------------------ running
def ppo_trl_python() -> Path:
    return trl_python("TRL_PPO_PYTHON", DEFAULT_TRL_PYTHON, "benchmarks/ppo.py")


def available_algorithms() -> tuple[str, ...]:
    """The project trainer's online algorithms (``trpo`` only once it exists)."""
    from kfp_components.trainer.config import RL_ALGORITHMS

    return tuple(RL_ALGORITHMS)


def train_reward_model(bench: PPOBenchmark, model_dir: Path, work: Path) -> dict[str, Any]:
    """The benchmark's reward model, trained in a fresh process; its folder and held-out accuracy."""
    options = reward_model_options(bench, str(model_dir), str(work))
    measured = train_ours_fresh(options, bench.torch_threads)
    evals = [row for row in measured["rows"] if "eval_accuracy" in row]
    if not evals:
        raise RuntimeError("reward-model training logged no evaluation (eval_accuracy)")
    return {
        "path": str(work / "final"),
        "steps": bench.reward_model_steps,
        "eval_accuracy": evals[-1]["eval_accuracy"],
        "eval_margin": evals[-1].get("eval_margin"),
        "seconds": round(measured["run_seconds"], 2),
    }


def run_trl(bench: PPOBenchmark, model_dir: Path, reward_model: str, work: Path, seed: int) -> dict[str, Any]:
    """One TRL run in its own interpreter; per-step timings and scores (see ``benchmarks/ppo_trl.py``)."""
    work.mkdir(parents=True, exist_ok=True)
    job = {
        "model": str(model_dir),
        "reward_model": reward_model,
        "prompts": str(PROMPTS),
        "ppo_config": trl_arguments(bench, str(work / "output"), seed),
        "output": str(work / "result.json"),
        "torch_threads": bench.torch_threads,
        "reward_input": bench.trl_reward_input,
    }
    result = run_trl_job(ppo_trl_python(), TRL_RUNNER, job, work, bench.torch_threads)
    return {"seed": seed, "config": job["ppo_config"], **result}


#: What the benchmark reads from each step row of our ``metrics.jsonl``.
OURS_STEP_KEYS = ("step", "seconds", "generation_seconds", "generation_tokens_per_second", "score_mean")


def ours_steps(metrics_rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per-step records in the benchmark's shape from the rows of our ``metrics.jsonl``; a step row without
    what the benchmark reads is an error. ``score`` is ``score_mean`` (the reward model's score less
    ``missing_eos_penalty``, as TRL's ``objective/scores``)."""
    return [
        {
            **times,
            "score": row["score_mean"],
            "kl_per_completion": row.get("kl_per_completion"),
            "value_loss": row.get("value_loss"),
        }
        for row, times in ours_step_rows(metrics_rows, OURS_STEP_KEYS)
    ]


def run_ours(
    bench: PPOBenchmark, model_dir: Path, reward_model: str, work: Path, seed: int, algorithm: str = "ppo"
) -> dict[str, Any]:
    """One run of the project's trainer with ``algorithm`` in a fresh process."""
    options = ours_options(
        bench, str(model_dir), reward_model, str(PROMPTS), str(work / "output"), seed, algorithm
    )
    measured = train_ours_fresh(options, bench.torch_threads)
    return {
        "seed": seed,
        "config": options,
        "run_seconds": measured["run_seconds"],
        "run_cpu_seconds": measured["run_cpu_seconds"],
        "torch_threads": measured["torch_threads"],
        "steps": ours_steps(measured["rows"]),
    }


# ------------------------------------------------------------------------------------------------ summary
def summarise(steps: Sequence[dict[str, Any]], run_cpu_seconds: float | None = None) -> dict[str, Any]:
    """Median step, generation and update seconds and the fastest step; generation share of all step time;
    CPU seconds of the whole run per step; mean score over the first and last :data:`CURVE_ENDS` steps."""
    return {
        **step_times(steps, run_cpu_seconds),
        **curve_ends(steps, "score"),
        "kl_last": mean([s.get("kl_per_completion") for s in steps[-CURVE_ENDS:]]),
    }


def summarise_runs(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One side over its runs, :func:`benchmarks.online_bench.summarise_side` on :func:`summarise` and the
    score, with the mean KL per completion of each run's last steps."""
    return summarise_side(
        runs, summarise, "score", lambda each: {"kl_last": mean([s["kl_last"] for s in each])}
    )


def compare(sides: dict[str, dict[str, Any] | None]) -> dict[str, Any]:
    """The issue's goals: our PPO step time at most 0.8x TRL's, an equal or better score after the same
    steps; A2C's and TRPO's step time over our PPO's. None where a side was not measured."""

    def summary(side: str) -> dict[str, Any] | None:
        measured = sides.get(side)
        return measured["summary"] if measured else None

    trl, ppo = summary("trl"), summary("ppo")
    both = trl is not None and ppo is not None
    step_ratio = ppo["step_seconds"] / trl["step_seconds"] if trl and ppo else None
    cpu = [s["cpu_seconds_per_step"] for s in (ppo, trl) if s is not None]
    relative = {
        f"{side}_over_ppo": (
            s["step_seconds"] / ppo["step_seconds"] if (s := summary(side)) and ppo else None
        )
        for side in ("a2c", "trpo")
    }
    return {
        "step_ratio": step_ratio,
        "cpu_ratio": cpu[0] / cpu[1] if both and None not in cpu else None,
        "step_goal_met": step_ratio <= 0.8 if step_ratio is not None else None,
        "score_goal_met": ppo["score_last"] >= trl["score_last"] if trl and ppo else None,
        **relative,
    }


# ------------------------------------------------------------------------------------------------ the run
def run(sides: Sequence[str] = SIDES, bench: PPOBenchmark | None = None) -> dict[str, Any]:
    """Every side (or ``sides``) on one freshly built tiny model and reward model; what ``benchmarks.run``
    stores. A side of ours whose algorithm the trainer does not have (yet) is skipped, with the reason."""
    bench = bench or PPOBenchmark()
    unknown = set(sides) - set(SIDES)
    if unknown:
        raise ValueError(f"unknown side(s) {sorted(unknown)}; choose from {SIDES}")
    if "trl" in sides:
        ppo_trl_python()  # before building anything
    have = available_algorithms()
    skipped = {
        side: f"the trainer has no algorithm {side}" for side in OURS if side in sides and side not in have
    }
    active = [side for side in SIDES if side in sides and side not in skipped]
    results: dict[str, dict[str, Any] | None] = dict.fromkeys(SIDES)
    summary = {
        "benchmark": dataclasses.asdict(bench),
        "model": {"arch": "qwen2", "seed": MODEL_SEED, **MODEL},
        "prompts": str(PROMPTS.relative_to(ROOT)),
        "sides": results,
        "skipped": skipped,
    }
    if not active:
        return {**summary, "reward_model": None, "goals": compare(results)}
    from kfp_components.testing.tiny_model import build_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_dir = build_tiny_model(work / "model", "qwen2", seed=MODEL_SEED, **MODEL)
        print("ppo: training the reward model ...", flush=True)
        reward_model = train_reward_model(bench, model_dir, work / "reward-model")

        def run_one(side: str, seed: int) -> dict[str, Any]:
            place = work / f"{side}-{seed}"
            if side == "trl":
                return run_trl(bench, model_dir, reward_model["path"], place, seed)
            return run_ours(bench, model_dir, reward_model["path"], place, seed, side)

        results.update(side_results(SIDES, take_turns(NAME, active, bench.seeds, run_one), summarise_runs))
    return {
        **summary,
        "reward_model": {key: value for key, value in reward_model.items() if key != "path"},
        "goals": compare(results),
    }


# ------------------------------------------------------------------------------------------------ report
def _ratio(value: float | None) -> str:
    return "not measured" if value is None else f"{value:.2f}x"


def render(result: dict[str, Any]) -> str:
    """The section of docs/performance.md."""
    bench, model, rm = result["benchmark"], result["model"], result["reward_model"]
    trained = (
        f"{rm['steps']} steps; held-out accuracy {rm['eval_accuracy']:.2f} on "
        "`examples/arithmetic_preferences_eval.jsonl`"
        if rm
        else "not trained: no side ran"
    )
    trl = result["sides"].get("trl")
    versions = trl["versions"] if trl else {}
    lines = [
        "## PPO against TRL",
        "",
        f"PPO on the tiny Qwen2-shaped policy of the GRPO section (hidden {model['hidden_size']}, "
        f"{model['num_layers']} layers, vocab {model['vocab_size']}; random weights) with the bundled arithmetic "
        f"prompts (`{result['prompts']}`), one completion per prompt, fp32 on the CPU with {bench['torch_threads']} "
        f"torch thread(s), the sides taking turns, each run in a fresh process, one run per seed "
        f"({', '.join(map(str, bench['seeds']))}): {bench['max_steps']} steps of {bench['completions_per_step']} "
        f"completions of at most {bench['max_new_tokens']} tokens, {bench['num_iterations']} PPO epochs x "
        f"{bench['num_mini_batches']} mini-batches, learning rate {bench['learning_rate']:g} (constant), "
        f"kl_coef {bench['kl_coef']:g} ({bench['kl_estimator']}, in the reward), gamma {bench['gamma']:g}, "
        f"lambda {bench['gae_lambda']:g}, clip {bench['epsilon']:g}, value clip {bench['value_clip']:g}, "
        f"vf_coef {bench['vf_coef']:g}, missing-EOS penalty {bench['missing_eos_penalty']:g}, no gradient "
        "clipping. The reward model is trained once per benchmark run by `algorithm: reward_model` on the "
        f"policy's checkpoint from `examples/arithmetic_preferences.jsonl` ({trained}); both sides load it, and their value models start from it "
        "(ours: `value_model_init: reward_model`). *Score*: the reward model's score less the missing-EOS "
        "penalty (TRL's `objective/scores`, our `score_mean`), mean over the runs of each run's first and last "
        f"{CURVE_ENDS} steps. Generation is the sampling call alone (TRL: `batch_generation`); update is the "
        "rest of the step (reference, value and reward passes, GAE, the PPO epochs). Times are medians over "
        "every step of every run; the machine is shared, so the fastest step and the CPU seconds of the whole "
        "runs per step are less sensitive to other load. *Outside the steps*: loading and start-up, mean of "
        "the runs.",
        "",
        "| trainer | step (s) | fastest step (s) | generation (s) | update (s) | generation share | CPU s per step "
        f"| outside the steps (s) | score, first {CURVE_ENDS} steps | score, last {CURVE_ENDS} steps | KL per "
        f"completion, last {CURVE_ENDS} |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    labels = {
        "trl": f"TRL {versions.get('trl', '')} `PPOTrainer`".replace("  ", " "),
        "ppo": "this engine, ppo",
        "a2c": "this engine, a2c",
        "trpo": "this engine, trpo",
    }
    skipped = result.get("skipped", {})
    for side in SIDES:
        measured = result["sides"].get(side)
        if measured is None:
            why = f"not measured ({skipped[side]})" if side in skipped else "not measured"
            lines.append(f"| {labels[side]} | {why} | | | | | | | | | |")
            continue
        s = measured["summary"]
        lines.append(
            f"| {labels[side]} | {seconds_text(s['step_seconds'])} | {seconds_text(s['fastest_step_seconds'])} | "
            f"{seconds_text(s['generation_seconds'])} | {seconds_text(s['update_seconds'])} | "
            f"{s['generation_share']:.0%} | {number_text(s['cpu_seconds_per_step'], 2)} | "
            f"{number_text(s['outside_steps_seconds'], 2)} | {number_text(s['score_first'])} | "
            f"{number_text(s['score_last'])} | {number_text(s['kl_last'])} |"
        )
    by_seed = [
        f"{labels[side]} "
        + ", ".join(f"{value:.3f}" for _, value in result["sides"][side]["summary"]["score_last_by_seed"])
        for side in SIDES
        if result["sides"].get(side) is not None
    ]
    goals = result["goals"]
    ratio = ratios_text(goals["step_ratio"], goals["cpu_ratio"])
    lines += [
        "",
        f"Score over the last {CURVE_ENDS} steps, run by run (seeds {', '.join(map(str, bench['seeds']))}): "
        + "; ".join(by_seed)
        + ".",
        "",
        "![Score per step and step time, TRL and this engine](ppo.png)",
        "",
        f"Goals: step time at most 0.8x TRL's: {goal_text(goals['step_goal_met'])}{ratio}; equal or better score "
        f"after the same steps: {goal_text(goals['score_goal_met'])}. Step time relative to this engine's ppo on "
        f"the same setup: a2c {_ratio(goals['a2c_over_ppo'])}, trpo {_ratio(goals['trpo_over_ppo'])} (a2c: one "
        "update of the whole batch, its own vf_coef 0.5 and entropy_coef 0.01; trpo: its own defaults).",
        "",
        "What differs between the sides:",
        "",
        *[f"- {text}" for text in DIFFERENCES],
    ]
    if versions:
        lines += [
            "",
            "TRL side: "
            + ", ".join(f"{name} {version}" for name, version in versions.items())
            + " in its own virtual environment (not a dependency).",
        ]
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path = PLOT) -> None:
    """Score per step (left) and step time with its generation part (right), every measured side."""
    plot_sides(
        result,
        path,
        sides=SIDES,
        colours={"trl": "tab:orange", "ppo": "tab:blue", "a2c": "tab:green", "trpo": "tab:purple"},
        names={"trl": "TRL PPOTrainer", "ppo": "ppo", "a2c": "a2c", "trpo": "trpo"},
        key="score",
        curve_ylabel="score (reward model - missing-EOS penalty)",
        curve_title="Score per step: each seed (faint) and their mean",
        xlabel="step",
        title="PPO on a tiny model, CPU: TRL vs this engine (and a2c, trpo)",
        faint_alpha=0.2,
        legend_fontsize=7,
    )


def write_report() -> None:
    """The plot from the stored result (``benchmarks.run`` renders docs/performance.md)."""
    plot_stored(NAME, plot)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argument_parser(__doc__, SIDES)
    parser.add_argument("--steps", type=int, help="steps per run (default: the benchmark's)")
    parser.add_argument("--seeds", type=int, nargs="+", help="seeds (default: the benchmark's)")
    parser.add_argument(
        "--trl-reward-input",
        choices=("token_ids", "conversation"),
        help="what TRL's reward model reads (default: the benchmark's, token_ids)",
    )
    args = parser.parse_args(argv)
    if not args.render_only:
        bench = PPOBenchmark()
        if args.steps:
            bench = dataclasses.replace(bench, max_steps=args.steps)
        if args.seeds:
            bench = dataclasses.replace(bench, seeds=tuple(args.seeds))
        if args.trl_reward_input:
            bench = dataclasses.replace(bench, trl_reward_input=args.trl_reward_input)
        result = run(args.sides, bench)
        store(NAME, result)
        print(render(result))
    write_report()
    render_performance(NAME, PLOT)


if __name__ == "__main__":
    main()
