"""OSFT fine-tuning pipeline: download -> train -> evaluate -> register (Orthogonal Subspace Fine-Tuning).

Compile: ``python -m pipelines.training.osft.pipeline`` (writes ``pipeline.yaml`` beside this file).
"""

from kfp import dsl

from kfp_components.images import TRAINER_IMAGE

from ..common import add_stages, compile_to, with_parameter_docs

DEFAULT_MODEL = "Qwen/Qwen2.5-1.5B-Instruct"
DEFAULT_WORKSPACE = "fine-tuning-workspace"


@dsl.pipeline(
    name="osft-fine-tuning",
    description="Download and validate a chat dataset, then fine-tune a model with Orthogonal Subspace "
    "Fine-Tuning (learns the new task in the base model's least-used directions, so it forgets less).",
)
@with_parameter_docs
def osft_pipeline(
    phase_01_dataset_man_data_uri: str,
    phase_01_dataset_opt_split: str = "",
    phase_01_dataset_opt_on_invalid: str = "fail",
    phase_01_dataset_opt_train_split_ratio: float = 0.9,
    phase_01_dataset_opt_subset_size: int = 0,
    phase_02_train_man_train_model: str = DEFAULT_MODEL,
    phase_02_train_man_train_batch: int = 128,
    phase_02_train_man_train_epochs: int = 1,
    phase_02_train_man_train_unfreeze: float = 0.25,
    phase_02_train_man_train_tokens: int = 64000,
    phase_02_train_man_train_workers: int = 1,
    phase_02_train_man_train_gpu: int = 1,
    phase_02_train_opt_use_liger: bool = True,
    phase_02_train_opt_learning_rate: float = 5e-6,
    phase_02_train_opt_lr_scheduler: str = "cosine",
    phase_02_train_opt_warmup_steps: int = 0,
    phase_02_train_opt_weight_decay: float = 0.0,
    phase_02_train_opt_max_steps: int = 0,
    phase_02_train_opt_max_seq_len: int = 4096,
    phase_02_train_opt_seed: int = 42,
    phase_02_train_opt_torch_dtype: str = "bfloat16",
    phase_02_train_opt_activation_checkpointing: bool = False,
    phase_02_train_opt_eval_steps: int = 0,
    phase_02_train_opt_checkpoint_every_steps: int = 0,
    phase_02_train_opt_backend: str = "trainjob",
    phase_02_train_opt_timeout_seconds: int = 0,
    phase_02_train_opt_image: str = TRAINER_IMAGE,
    phase_02_train_opt_runtime: str = "torch-distributed",
    phase_02_train_opt_trainer_api_version: str = "auto",
    phase_02_train_opt_cpu: str = "",
    phase_02_train_opt_memory: str = "",
    phase_02_train_opt_node_selector: dict = {},  # noqa: B006 (KFP needs a literal default)
    phase_02_train_opt_tolerations: list = [],  # noqa: B006
    phase_02_train_opt_workspace_pvc: str = DEFAULT_WORKSPACE,
    phase_02_train_opt_queue_name: str = "",
    phase_02_train_opt_labels: dict = {},  # noqa: B006
    phase_02_train_opt_annotations: dict = {},  # noqa: B006
    phase_02_train_opt_env: dict = {},  # noqa: B006
    phase_02_train_opt_image_pull_secrets: list = [],  # noqa: B006
    phase_02_train_opt_shm_size: str = "unlimited",
    phase_02_train_opt_training_options: dict = {},  # noqa: B006
    phase_03_eval_man_eval_tasks: list = ["arc_easy"],  # noqa: B006
    phase_03_eval_opt_num_fewshot: int = -1,
    phase_03_eval_opt_limit: float = 0.0,
    phase_03_eval_opt_batch_size: str = "auto",
    phase_03_eval_opt_apply_chat_template: str = "auto",
    phase_03_eval_opt_include_path: str = "",
    phase_03_eval_opt_compare_base: bool = True,
    phase_03_eval_opt_gpu: int = 1,
    phase_03_eval_opt_memory: str = "32Gi",
    phase_03_eval_opt_node_selector: dict = {},  # noqa: B006
    phase_03_eval_opt_tolerations: list = [],  # noqa: B006
    phase_03_eval_opt_gate: bool = False,
    phase_03_eval_opt_gate_min_task_gain: float = 0.0,
    phase_03_eval_opt_gate_min_retention: float = 0.95,
    phase_04_registry_man_address: str = "",
    phase_04_registry_man_model_name: str = "osft-fine-tuned-model",
    phase_04_registry_opt_port: int = 0,
    phase_04_registry_opt_is_secure: bool = True,
    phase_04_registry_opt_allow_insecure_token: bool = False,
    phase_04_registry_opt_author: str = "kfp-components",
    phase_04_registry_opt_version_name: str = "",
    phase_04_registry_opt_on_existing_version: str = "fail",
    phase_04_registry_opt_storage_uri: str = "",
    phase_04_registry_opt_storage_endpoint: str = "",
    phase_04_registry_opt_storage_key: str = "",
):
    add_stages("osft", locals())


def compile_pipeline(output_path=None):
    return compile_to(osft_pipeline, __file__, output_path)


if __name__ == "__main__":
    print(compile_pipeline())
