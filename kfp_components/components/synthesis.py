"""The ``synthesize_reasoning_data`` component: a teacher writes step-by-step solutions, the verified ones become
a ``messages`` dataset for the training steps.

The teacher step runs on its own, so the expensive teacher can be an endpoint in the cluster (KServe, vLLM)
while the training steps use the GPUs. No ``from __future__ import annotations`` here: KFP reads the real
annotation objects.
"""

from kfp import dsl

from kfp_components.images import RUNTIME_IMAGE


# The runtime image holds the openai client and a CPU PyTorch (a small local teacher); for a local teacher on a
# GPU, set the task's image to the trainer image and ask for a GPU.
@dsl.component(base_image=RUNTIME_IMAGE, install_kfp_package=False)
def synthesize_reasoning_data(
    problems: dsl.Input[dsl.Dataset],
    dataset: dsl.Output[dsl.Dataset],
    unsolved: dsl.Output[dsl.Dataset],
    metrics: dsl.Output[dsl.Metrics],
    teacher_model: str,
    teacher_backend: str = "openai",
    teacher_base_url: str = "",
    teacher_token_env: str = "",
    teacher_token_optional: bool = False,
    system_prompt: str = (
        "You are a careful teacher. Solve the problem step by step: show your reasoning, one step per line."
        " End with a final line of the form '#### <answer>' holding only the final answer."
    ),  # TeacherOptions' default (a test checks)
    prompt_template: str = "{prompt}",
    num_samples: int = 4,
    temperature: float = 0.7,
    top_p: float = 1.0,
    max_tokens: int = 512,
    max_concurrency: int = 8,
    timeout_seconds: float = 60.0,
    retries: int = 3,
    backoff_seconds: float = 1.0,
    max_requests: int = 0,
    batch_size: int = 8,
    device: str = "",
    dtype: str = "float32",
    answer_column: str = "answer",
    answer_checker: str = "",
    answer_tolerance: float = 0.0,
    min_trace_chars: int = 0,
    max_trace_chars: int = 0,
    language: str = "",
    dedup_threshold: float = 1.0,
    max_traces_per_problem: int = 0,
    seed: int = 42,
    chunk_size: int = 32,
    resume_dir: str = "",
) -> int:
    """Sample step-by-step solutions from a teacher and keep those whose final answer matches the reference.

    The API key is read from the environment variable teacher_token_env (set it from a Kubernetes secret); it
    is never logged or written.

    Args:
        problems: prompt rows (JSONL) with the reference answer in answer_column, e.g. from dataset_download.
        teacher_model: openai: the served model's name (as /v1/models lists it); local: a folder or hub id.
        teacher_backend: openai (an OpenAI-compatible endpoint: vLLM, KServe, TGI, a hosted API) or local (a
            Hugging Face causal LM sampled with the RL engine's rollout code).
        teacher_base_url: openai: http(s)://host:port/v1, without credentials.
        teacher_token_env: Environment variable holding the endpoint's API key; empty: no key.
        teacher_token_optional: teacher_token_env comes from an optional Kubernetes Secret: when it is not
            set, the teacher is called without a key (with a warning). Off: it must be set.
        system_prompt: A system message sent before each problem (empty: none); the default asks for reasoning
            and a final line "#### <answer>".
        prompt_template: The user message of a problem: {prompt} (required) and any column of the rows.
        num_samples: Traces sampled per problem.
        temperature: Sampling temperature; above 0 when num_samples > 1. 0: greedy.
        top_p: Nucleus sampling probability mass (1: off).
        max_tokens: Most tokens of one trace.
        max_concurrency: openai: requests in flight at once.
        timeout_seconds: openai: timeout of one request.
        retries: openai: further attempts after a 429, a 5xx, a connection error or a timeout.
        backoff_seconds: openai: wait before the first retry; it doubles each retry (a Retry-After header wins).
        max_requests: openai: the request budget of the run (attempts, retries included); 0: no limit. A run
            stopped by it continues from where it stopped when rerun with resume_dir and a larger budget.
        batch_size: local: problems per generate call.
        device: local: the teacher's device (cpu, cuda:0); empty: a GPU when there is one.
        dtype: local: the weights' dtype (float32, bfloat16, float16, auto).
        answer_column: Column of the problem rows holding the reference answer.
        answer_checker: module:function or path/to/file.py:function called as checker(trace, reference) ->
            bool; empty: the extracted final answer ("#### N", boxed, "the answer is N", the last number)
            must equal the reference.
        answer_tolerance: Numbers also match when |a - b| <= answer_tolerance * max(1, |b|).
        min_trace_chars: Shortest kept trace in characters (0: no bound).
        max_trace_chars: Longest kept trace in characters (0: no bound).
        language: Empty, or the script most letters of a kept trace must be in (latin, cyrillic, greek,
            arabic, hebrew, cjk, hangul, devanagari, thai).
        dedup_threshold: Drop a trace whose word 3-shingle Jaccard similarity to a kept trace of the same
            problem is at least this; 1.0 drops only traces with the same words.
        max_traces_per_problem: Keep at most this many traces per problem (0: all that pass).
        seed: Seed of the sampling; each problem's seed derives from it and the problem's index.
        chunk_size: Problems per chunk; progress is recorded after each. At most chunk_size requests are in
            flight, so make it at least max_concurrency.
        resume_dir: A folder on a mounted volume holding the partial output and the progress across reruns
            (a rerun with the same problems and options continues after the problems done); empty: none.

    Returns:
        dataset: messages rows (user: the problem as sent; assistant: the trace) with teacher, sample_index,
            verified, problem (0-based index) and answer.
        unsolved: The problems without a kept trace (JSONL): the problem, the teacher's first trace, what was
            extracted from it and why its traces were dropped.
        metrics: problems, traces_generated, traces_kept, verified_share, dropped_<reason>,
            problems_without_trace, prompt_tokens, completion_tokens, requests, retries, resumed_problems.
        Output: The number of traces kept.
    """
    import os
    import shutil

    from kfp_components.environment import ensure_writable_caches
    from kfp_components.feedback.endpoint import optional_token_env
    from kfp_components.feedback.synthesis import RejectionOptions, synthesize
    from kfp_components.feedback.teacher import TeacherOptions
    from kfp_components.logs import configure_logging
    from kfp_components.typed_config import from_dict

    configure_logging()
    ensure_writable_caches()
    if teacher_token_optional:
        teacher_token_env = optional_token_env(teacher_token_env)
    teacher = from_dict(
        TeacherOptions,
        {
            "backend": teacher_backend,
            "model": teacher_model,
            "base_url": teacher_base_url,
            "token_env": teacher_token_env,
            "system_prompt": system_prompt,
            "prompt_template": prompt_template,
            "num_samples": num_samples,
            "temperature": temperature,
            "top_p": top_p,
            "max_tokens": max_tokens,
            "max_concurrency": max_concurrency,
            "timeout_seconds": timeout_seconds,
            "retries": retries,
            "backoff_seconds": backoff_seconds,
            "max_requests": max_requests,
            "batch_size": batch_size,
            "device": device,
            "dtype": dtype,
        },
    )
    rejection = from_dict(
        RejectionOptions,
        {
            "answer_column": answer_column,
            "answer_checker": answer_checker,
            "answer_tolerance": answer_tolerance,
            "min_trace_chars": min_trace_chars,
            "max_trace_chars": max_trace_chars,
            "language": language,
            "dedup_threshold": dedup_threshold,
            "max_traces_per_problem": max_traces_per_problem,
        },
    )
    if resume_dir:
        output, unsolved_file = (
            os.path.join(resume_dir, "reasoning.jsonl"),
            os.path.join(resume_dir, "unsolved.jsonl"),
        )
    else:
        output, unsolved_file = dataset.path, unsolved.path
    summary = synthesize(
        problems.path,
        output,
        teacher,
        rejection,
        seed=seed,
        chunk_size=chunk_size,
        unsolved_path=unsolved_file,
        record_done=bool(resume_dir),  # a rerun finds the finished synthesis there
    )
    if resume_dir:
        for source, artifact in ((output, dataset), (unsolved_file, unsolved)):
            os.makedirs(os.path.dirname(artifact.path) or ".", exist_ok=True)
            shutil.copyfile(source, artifact.path)
    dataset.metadata.update({"format": "messages", "rows": summary.traces_kept, "teacher": teacher_model})
    unsolved.metadata.update({"rows": summary.problems_without_trace})
    for name, value in summary.metrics().items():
        metrics.log_metric(name, value)
    return summary.traces_kept
