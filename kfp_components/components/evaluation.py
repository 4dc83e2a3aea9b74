"""The ``evaluate_model`` component: score a model (and optionally its base) with lm-evaluation-harness.

No ``from __future__ import annotations`` here: KFP reads the real annotation objects.
"""

from kfp import dsl

from kfp_components.images import TRAINER_IMAGE


# The trainer image: CUDA PyTorch and lm-eval (vLLM where installed), so evaluation can use the GPUs it asks for.
@dsl.component(base_image=TRAINER_IMAGE, install_kfp_package=False)
def evaluate_model(
    model: dsl.Input[dsl.Model],
    metrics: dsl.Output[dsl.Metrics],
    results: dsl.Output[dsl.Artifact],
    summary: dsl.Output[dsl.Markdown],
    tasks: list,
    num_fewshot: int = -1,
    limit: float = 0.0,
    batch_size: str = "auto",
    gen_kwargs: dict = {},  # noqa: B006 (KFP needs a literal default)
    apply_chat_template: str = "auto",
    system_instruction: str = "",
    backend: str = "hf",
    device: str = "auto",
    torch_dtype: str = "auto",
    include_path: str = "",
    log_samples: bool = False,
    base_model_name_or_path: str = "",
    compare_base: bool = True,
    workspace_pvc: str = "",
    workspace_path: str = "/workspace",
) -> float:
    """Evaluate a model on lm-eval tasks; log flat metrics and a summary table.

    The model is read in place from ``model.path`` (no copy).

    Args:
        model: Hugging Face checkpoint folder, e.g. from train_model.
        tasks: lm-eval task, group or tag names, e.g. ["arc_easy", "hellaswag"]; the bundled offline tasks
            are kfp_capitals, kfp_arithmetic (tag kfp_smoke) and kfp_reasoning_arithmetic (tag kfp_reasoning).
        num_fewshot: Few-shot examples per prompt; -1 keeps each task's default.
        limit: Examples per task: a count (>= 1) or a fraction (< 1); 0 evaluates all.
        batch_size: A number, "auto" or "auto:N".
        gen_kwargs: Generation options for generate_until tasks, e.g. {"max_gen_toks": 256}.
        apply_chat_template: auto (when the tokenizer has a chat template), true or false.
        system_instruction: System prompt for every request; empty for none.
        backend: hf or vllm (vllm needs a CUDA GPU and vllm in the image).
        device: auto, cpu, cuda or cuda:N.
        torch_dtype: auto (the checkpoint's), bfloat16, float16 or float32.
        include_path: Folder of custom task YAMLs (e.g. on a mounted volume); empty for none.
        log_samples: Also write per-sample logs (samples_<task>.jsonl) into results.
        base_model_name_or_path: The model before fine-tuning, scored too for a forgetting check; empty to skip.
            A Hugging Face id, a mounted folder, pvc://claim/path or s3://bucket/prefix (downloaded with the
            AWS_* credentials and endpoint of the step's environment; for clusters without Hub access).
        compare_base: Score base_model_name_or_path too (per-task deltas and retention); false skips it.
        workspace_pvc: The claim mounted at workspace_path; pvc://<workspace_pvc>/... is read there. Other
            claims are read under $KFP_COMPONENTS_PVC_ROOT/<claim> (default /mnt/pvc).
        workspace_path: Where workspace_pvc is mounted.

    Returns:
        metrics: <task>_<metric>[_<filter>] and ..._stderr; with a base model also base_<name>,
            <name>_delta, <name>_retention and mean_retention.
        results: A folder with results.json, summary.md, summary.html and samples_<task>.jsonl.
        summary: The Markdown summary table: each score of the tuned model, and with a base model its
            score, the delta and the retention, with the mean retention.
        Output: The mean retention with a base model, else the mean of the task scores.
    """
    import os
    import shutil

    from kfp_components.environment import ensure_writable_caches
    from kfp_components.evaluation import EvalConfig, run_evaluation
    from kfp_components.logs import configure_logging
    from kfp_components.typed_config import from_dict

    configure_logging()
    ensure_writable_caches()
    chat = {"auto": None, "true": True, "false": False}.get(apply_chat_template.strip().lower(), "invalid")
    if chat == "invalid":
        raise ValueError(f"apply_chat_template: expected auto, true or false, got {apply_chat_template!r}")
    batch = int(batch_size) if batch_size.strip().isdigit() else batch_size.strip()
    os.makedirs(results.path, exist_ok=True)
    config = from_dict(
        EvalConfig,
        {
            "model_path": model.path,
            "tasks": list(tasks),
            "output_dir": results.path,
            "num_fewshot": None if num_fewshot < 0 else num_fewshot,
            "limit": None if limit <= 0 else limit,
            "batch_size": batch,
            "gen_kwargs": dict(gen_kwargs),
            "apply_chat_template": chat,
            "system_instruction": system_instruction,
            "backend": backend,
            "device": device,
            "torch_dtype": torch_dtype,
            "include_path": include_path,
            "log_samples": log_samples,
            "base_model_name_or_path": base_model_name_or_path if compare_base else "",
            "workspace_pvc": workspace_pvc,
            "workspace_path": workspace_path,
        },
    )
    result = run_evaluation(config)
    for name, value in result.metrics.items():
        metrics.log_metric(name, value)
    shutil.copyfile(result.summary_md_path, summary.path)
    results.metadata.update(
        {
            "tasks": list(tasks),
            "apply_chat_template": result.apply_chat_template,
            "base_model_name_or_path": base_model_name_or_path if compare_base else "",
            "files": sorted(os.listdir(results.path)),
        }
    )
    if "mean_retention" in result.metrics:
        return float(result.metrics["mean_retention"])
    scores = [
        v for k, v in result.metrics.items() if not k.endswith("_stderr") and k != "chat_template_applied"
    ]
    return float(sum(scores) / len(scores)) if scores else 0.0
