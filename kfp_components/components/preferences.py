"""The ``label_preference_pairs`` component: a model answers every prompt twice and a judge says which answer
is better; the judged pairs are a ``preference`` dataset (rlaif's ``distilled`` and ``preference_data`` modes
in a compiled chain).

The library code is :func:`kfp_components.feedback.comparisons.label_preferences`, the same as the local rlaif
stage's. No ``from __future__ import annotations`` here: KFP reads the real annotation objects.
"""

from kfp import dsl

from kfp_components.images import RUNTIME_IMAGE


# The model samples in this step: a compiled chain sets its image to the trainer image (a GPU build of torch).
@dsl.component(base_image=RUNTIME_IMAGE, install_kfp_package=False)
def label_preference_pairs(
    prompts: dsl.Input[dsl.Dataset],
    preferences: dsl.Output[dsl.Dataset],
    metrics: dsl.Output[dsl.Metrics],
    judge: dict,
    model_name_or_path: str = "",
    model: dsl.Input[dsl.Model] = None,
    min_margin: float = 0.5,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    max_new_tokens: int = 256,
    max_seq_len: int = 2048,
    stop_strings: list = [],  # noqa: B006 (KFP needs a literal default)
    seed: int = 42,
    overlong: str = "drop",
) -> int:
    """Sample two answers per prompt from a model and keep the pairs a pairwise judge decides.

    The judge's API key is read from its token_env variable (set it from the Kubernetes Secret
    judge.token_secret); it is never logged or written.

    Args:
        prompts: prompt rows (JSONL), e.g. from dataset_download.
        judge: The judge's options (the JudgeOptions table: backend, model, base_url, token_env, the pairwise
            template, answer_a, answer_b, the endpoint's limits).
        model_name_or_path: The model that answers (a folder or hub id), when model is not given.
        model: A Model artifact that answers (the previous stage of a chain), instead of model_name_or_path.
        min_margin: Keep a pair when |2p - 1| is at least this (p: the order-averaged probability that the
            first answer is better); 0.5 keeps the pairs whose two orders agree.
        temperature: Sampling temperature of the answers (above 0: the two answers differ).
        top_p: Nucleus sampling probability mass (1: off).
        top_k: Sample from the k most likely tokens (0: off).
        max_new_tokens: Longest answer in tokens.
        max_seq_len: Longest prompt plus answer in tokens.
        stop_strings: Strings that end an answer.
        seed: Seed of the sampling.
        overlong: A prompt longer than max_seq_len - max_new_tokens tokens: drop or truncate.

    Returns:
        preferences: preference rows (prompt, chosen, rejected, the prompt row's other columns and
            judge_preference, the judge's probability that chosen is better).
        metrics: pairs/prompts, pairs/kept, pairs/dropped_identical, pairs/dropped_undecided,
            pairs/dropped_unjudged, pairs/mean_confidence and the judge's usage (judge/...).
        Output: The number of pairs kept.
    """
    from pathlib import Path

    from kfp_components.environment import ensure_writable_caches
    from kfp_components.logs import configure_logging

    configure_logging()
    ensure_writable_caches()

    from kfp_components.feedback.comparisons import label_preferences
    from kfp_components.feedback.judges import JudgeOptions
    from kfp_components.launch.step import whole_numbers
    from kfp_components.trainer.rollout import SamplingOptions
    from kfp_components.typed_config import from_dict

    if (model is None) == (not model_name_or_path):
        raise ValueError("give the model that answers as model or as model_name_or_path, one of them")
    options = from_dict(JudgeOptions, whole_numbers(dict(judge)), "judge")  # checked before the model loads
    sampling = SamplingOptions(
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        max_new_tokens=max_new_tokens,
        stop_strings=tuple(stop_strings),
        num_generations=2,
    )
    found = label_preferences(
        model.path if model is not None else model_name_or_path,
        prompts.path,
        Path(preferences.path),
        options,
        sampling,
        min_margin=min_margin,
        max_seq_len=max_seq_len,
        seed=seed,
        overlong=overlong,
    )
    kept = int(found["pairs/kept"])
    preferences.metadata.update({"format": "preference", "rows": kept, "judge": options.model})
    for name, value in found.items():
        metrics.log_metric(name.replace("/", "_"), value)
    return kept
