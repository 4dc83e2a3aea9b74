"""The ``promotion_gate`` and ``online_training_options`` components: small steps between evaluation,
training and registration. Their logic is in :mod:`kfp_components.evaluation.gate` and
:mod:`kfp_components.launch.reward_options`.

No ``from __future__ import annotations`` here: KFP reads the real annotation objects.
"""

from kfp import dsl

from kfp_components.images import RUNTIME_IMAGE


@dsl.component(base_image=RUNTIME_IMAGE, install_kfp_package=False)
def promotion_gate(
    eval_metrics: dsl.Input[dsl.Metrics],
    metrics: dsl.Output[dsl.Metrics],
    summary: dsl.Output[dsl.Markdown],
    enabled: bool = False,
    min_task_gain: float = 0.0,
    min_retention: float = 0.95,
) -> bool:
    """Decide whether the evaluated model may be registered.

    Args:
        eval_metrics: The evaluation step's metrics (with a base model: <score>_delta and mean_retention).
        enabled: Register only when the evaluation passes the thresholds; off, every model is registered.
        min_task_gain: Lowest mean gain (tuned - base) over the evaluated scores, e.g. 0.0: no worse on
            average.
        min_retention: Lowest mean retention of the base model's scores (tuned / base), e.g. 0.95.

    Returns:
        metrics: gate_passed (1 or 0), gate_enabled, the thresholds, gate_mean_task_gain and
            gate_mean_retention; the reason as gate_reason in the metadata.
        summary: The decision and its reason.
        Output: Whether registration runs (one output, which kfp.local's conditions can read too).
    """
    import logging

    from kfp_components.evaluation.gate import GateOptions, decide
    from kfp_components.logs import configure_logging
    from kfp_components.typed_config import from_dict

    configure_logging()
    options = from_dict(
        GateOptions, {"enabled": enabled, "min_task_gain": min_task_gain, "min_retention": min_retention}
    )
    decision = decide(dict(eval_metrics.metadata), options)
    for name, value in decision.metrics.items():
        metrics.log_metric(name, value)
    metrics.metadata["gate_reason"] = decision.reason
    with open(summary.path, "w") as handle:
        handle.write(f"# Promotion gate\n\n**{'registered' if decision.passed else 'not registered'}**: ")
        handle.write(f"{decision.reason}\n")
    logging.getLogger("kfp_components.gate").info("promotion gate %s", decision.reason)
    return decision.passed


@dsl.component(base_image=RUNTIME_IMAGE, install_kfp_package=False)
def online_training_options(
    training_options: dict = {},  # noqa: B006 (KFP needs a literal default)
    reward_functions: list = [],  # noqa: B006
    reward_model_path: str = "",
    judge_base_url: str = "",
    judge_model: str = "",
    judge_token_secret: str = "",
) -> dict:
    """The training step's training_options with the rewards of an online algorithm added.

    Args:
        training_options: Any other option of the training engine by its name; may not set what the other
            arguments set.
        reward_functions: Reward functions (names or mappings with their options); empty: none here.
        reward_model_path: Reward model folder or hub id; empty: none.
        judge_base_url: An endpoint judge added as the last reward (http(s)://host:port/v1); empty: no judge.
        judge_model: The judge's served model name.
        judge_token_secret: Kubernetes Secret (<secret> or <secret>/<key>) holding the judge's API key; the
            TrainJob's workers get it as JUDGE_API_KEY. Empty: no key.

    Returns:
        Output: The merged training_options.
    """
    from kfp_components.launch.reward_options import judge_reward, with_rewards

    judge = judge_reward(judge_base_url, judge_model, judge_token_secret) if judge_base_url else None
    return with_rewards(
        dict(training_options),
        reward_functions=list(reward_functions),
        reward_model_path=reward_model_path,
        judge=judge,
    )
