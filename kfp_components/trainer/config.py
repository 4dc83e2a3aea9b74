"""The training engine's options: one set of typed dataclasses for the trainer CLI, the components and the
multi-stage YAML.

Options come in groups that the stage configs reuse, so an option has one name and one meaning everywhere:

* :class:`OptimOptions`: data handling, batching, optimizer, schedule, precision, distribution, checkpoints;
* :class:`OSFTOptions`, :class:`LoRAOptions`, :class:`DPOOptions`, :class:`RewardModelTrainingOptions`,
  :class:`RLOptions`: what each method adds;
* :class:`DistillationOptions`: logit distillation from a local teacher (sft and osft);
* :class:`TrackingOptions`: where the step metrics are reported besides ``metrics.jsonl`` (TensorBoard,
  MLflow).

:class:`TrainingConfig` is all of them plus what one run needs (model, data, output, algorithm). Every field
is a command-line flag of ``python -m kfp_components.trainer`` (``--learning_rate 2e-5``) and a key of its
``--config`` YAML; flags override the file.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, get_args

from kfp_components.typed_config import ConfigError, Options

#: The online algorithms: the model generates, rewards score, a policy-gradient step learns.
RLAlgorithm = Literal["grpo", "rloo", "reinforce_pp", "ppo", "a2c", "trpo"]
RL_ALGORITHMS: tuple[str, ...] = get_args(RLAlgorithm)
#: The online algorithms with a value model (a critic) and GAE advantages.
VALUE_ALGORITHMS: tuple[str, ...] = ("ppo", "a2c", "trpo")
Algorithm = Literal[
    "sft", "osft", "dpo", "reward_model", "grpo", "rloo", "reinforce_pp", "ppo", "a2c", "trpo"
]
ALGORITHMS: tuple[str, ...] = get_args(Algorithm)
TorchDtype = Literal["bfloat16", "float16", "float32"]
#: Attention kernels: auto (the engine chooses, see kfp_components.trainer.attention), the per-sample sdpa
#: kernel of that module, and the kernels transformers ships.
AttnImplementation = Literal[
    "sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention", "auto", "sdpa_per_sample"
]


def _at_least(config: object, names: tuple[str, ...], minimum: float) -> None:
    for name in names:
        value = getattr(config, name)
        if value < minimum:
            rule = "must not be negative" if minimum == 0 else f"must be at least {minimum}"
            raise ConfigError(name, f"{rule}, got {value}")


@dataclass(kw_only=True)
class OptimOptions(Options):
    """How to train, whatever the method.

    Attributes:
        torch_dtype: Compute precision over fp32 master weights: bfloat16 (autocast on a GPU), float16
            (autocast with dynamic loss scaling, for GPUs without bf16) or float32. A CPU computes in
            float32 whatever is set (and says so once).
        max_seq_len: Longest sample in tokens; longer samples are handled by `overlong`.
        overlong: drop (skip and count) or truncate samples longer than max_seq_len.
        unmask: Train on every token, not only the assistant turns.
        data_format: The rows sft and osft train on: messages (chat, the loss on the assistant turns) or
            text (plain text for continued pre-training: the loss on every token, an end-of-text token
            after each row).
        effective_batch_size: Samples (DPO: preference pairs) per optimizer step across all ranks.
        max_tokens_per_gpu: Token budget of one micro-batch on one rank; packing and gradient accumulation
            fill each step with effective_batch_size samples under this budget.
        num_train_epochs: Passes over the data (ignored when max_steps is set).
        max_steps: Train exactly this many optimizer steps, starting further passes over the data as needed;
            overrides num_train_epochs (0: num_train_epochs decides).
        learning_rate: Peak learning rate of AdamW.
        adam_beta1: AdamW beta1.
        adam_beta2: AdamW beta2.
        adam_epsilon: AdamW epsilon.
        weight_decay: AdamW decoupled weight decay.
        lr_scheduler: constant, linear or cosine decay after warmup (alias: lr_scheduler_type).
        warmup_steps: Linear warmup from 0 over this many optimizer steps.
        max_grad_norm: Clip the global gradient norm (0: no clipping).
        seed: Seed for data order, initialisation of LoRA weights and dropout.
        activation_checkpointing: Recompute activations in backward to save memory (alias:
            gradient_checkpointing).
        use_liger: Liger fused kernels (GPU only; on a CPU a warning and the plain path).
        distributed: fsdp (FSDP2, sharded) or ddp when run under torchrun with more than one process (trpo
            and LoRA: ddp).
        attn_implementation: Attention kernel. auto: attention per sample of a packed micro-batch, chosen
            for the machine (trpo and CPUs: sdpa_per_sample; a CUDA GPU: flash_attention_2 when flash-attn is
            installed, the GPU is Ampere or newer and torch_dtype is 16-bit, else sdpa_per_sample; the log
            says which and why). sdpa_per_sample: sdpa once per sample. sdpa and eager attend over the whole
            packed row (cost grows with its square); flash_attention_2/3 and flex_attention as named.
        checkpoint_every_steps: Save a resumable checkpoint every N optimizer steps (0: only at the end;
            alias: save_steps).
        keep_checkpoints: How many resumable checkpoints to keep (alias: save_total_limit).
        resume: Continue from the newest checkpoint in output_dir when there is one.
        save_final_model: Write the final Hugging Face checkpoint to ``<output_dir>/final``.
        log_every_steps: Log a line (and a progress bar update) every N steps (alias: logging_steps).
        eval_steps: With eval data, compute the eval loss every N optimizer steps too (0: only at the end of
            each epoch).
    """

    option_aliases: ClassVar[dict[str, str]] = {
        "lr_scheduler_type": "lr_scheduler",
        "gradient_checkpointing": "activation_checkpointing",
        "save_steps": "checkpoint_every_steps",
        "save_total_limit": "keep_checkpoints",
        "logging_steps": "log_every_steps",
    }

    torch_dtype: TorchDtype = "bfloat16"
    max_seq_len: int = 4096
    overlong: Literal["drop", "truncate"] = "drop"
    unmask: bool = False
    data_format: Literal["messages", "text"] = "messages"
    effective_batch_size: int = 128
    max_tokens_per_gpu: int = 64000
    num_train_epochs: int = 1
    max_steps: int = 0
    learning_rate: float = 1e-5
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_epsilon: float = 1e-8
    weight_decay: float = 0.0
    lr_scheduler: Literal["constant", "linear", "cosine"] = "cosine"
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    seed: int = 42
    activation_checkpointing: bool = False
    use_liger: bool = False
    distributed: Literal["fsdp", "ddp"] = "fsdp"
    attn_implementation: AttnImplementation = "auto"
    checkpoint_every_steps: int = 0
    keep_checkpoints: int = 2
    resume: bool = False
    save_final_model: bool = True
    log_every_steps: int = 1
    eval_steps: int = 0

    def validate(self) -> None:
        _at_least(
            self,
            (
                "max_seq_len",
                "effective_batch_size",
                "max_tokens_per_gpu",
                "num_train_epochs",
                "log_every_steps",
                "keep_checkpoints",
            ),
            1,
        )
        _at_least(
            self,
            (
                "max_steps",
                "warmup_steps",
                "checkpoint_every_steps",
                "eval_steps",
                "weight_decay",
                "max_grad_norm",
            ),
            0,
        )
        if self.learning_rate <= 0:
            raise ConfigError("learning_rate", f"must be positive, got {self.learning_rate}")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(name, f"must be in [0, 1), got {getattr(self, name)}")
        if self.adam_epsilon <= 0:
            raise ConfigError("adam_epsilon", f"must be positive, got {self.adam_epsilon}")
        if self.max_tokens_per_gpu < self.max_seq_len:
            raise ConfigError(
                "max_tokens_per_gpu",
                f"{self.max_tokens_per_gpu} is smaller than max_seq_len {self.max_seq_len}: a sample of "
                "max_seq_len tokens would not fit in one micro-batch; raise max_tokens_per_gpu or lower "
                "max_seq_len",
            )


@dataclass(kw_only=True)
class OSFTOptions(Options):
    """Orthogonal Subspace Fine-Tuning.

    Attributes:
        unfreeze_rank_ratio: Share of each target weight's singular directions that train, in (0, 1];
            1.0 trains every direction.
        target_patterns: Regexes of module names to decompose (default: chosen by model_type).
    """

    unfreeze_rank_ratio: float = 0.25
    target_patterns: list[str] = field(default_factory=list)

    def validate(self) -> None:
        if not 0 < self.unfreeze_rank_ratio <= 1:
            raise ConfigError(
                "unfreeze_rank_ratio",
                f"must be in (0, 1] (1.0 trains every singular direction), got {self.unfreeze_rank_ratio}",
            )
        for i, pattern in enumerate(self.target_patterns):
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ConfigError(f"target_patterns[{i}]", f"not a valid regular expression: {exc}") from None


@dataclass(kw_only=True)
class LoRAOptions(Options):
    """LoRA adapters through peft (SFT).

    Attributes:
        lora_r: LoRA rank; 0 means full fine-tuning.
        lora_alpha: LoRA scaling numerator (the update is scaled by lora_alpha / lora_r).
        lora_dropout: Dropout on the LoRA input, in [0, 1).
        lora_target_modules: Module names to adapt, or ["all-linear"].
        qlora: Load the base model in 4 bit for LoRA (needs bitsandbytes and a GPU).
    """

    lora_r: int = 0
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lora_target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    qlora: bool = False

    def validate(self) -> None:
        _at_least(self, ("lora_r", "lora_alpha"), 0)
        if not 0 <= self.lora_dropout < 1:
            raise ConfigError("lora_dropout", f"must be in [0, 1), got {self.lora_dropout}")
        if not self.lora_target_modules:
            raise ConfigError(
                "lora_target_modules", 'empty; name modules such as [q_proj, v_proj] or ["all-linear"]'
            )
        if self.qlora and not self.lora_r:
            raise ConfigError("qlora", "QLoRA needs lora_r > 0")


@dataclass(kw_only=True)
class OSFTConstraintOptions(Options):
    """OSFT's constraint around another method (dpo, grpo, rloo, reinforce_pp).

    Attributes:
        osft_constraint: Train inside the OSFT constraint: the base model's top singular subspace stays
            frozen (uses unfreeze_rank_ratio and target_patterns).
    """

    osft_constraint: bool = False

    def validate(self) -> None:
        """A flag: nothing to check on its own (see :meth:`TrainingConfig.validate` for combinations)."""


@dataclass(kw_only=True)
class DPOOptions(OSFTConstraintOptions):
    """Direct Preference Optimization.

    Attributes:
        beta: Strength of the KL constraint to the reference model (higher: stay closer).
        loss_type: sigmoid (the DPO paper), ipo (identity preference optimisation) or hinge (SLiC).
        label_smoothing: Assumed share of flipped preference labels (conservative DPO; sigmoid loss only).
        ref_model_name_or_path: Reference model (default: the model training starts from). Its log-probs are
            computed once, before training, so it never sits in memory beside the policy.
    """

    beta: float = 0.1
    loss_type: Literal["sigmoid", "ipo", "hinge"] = "sigmoid"
    label_smoothing: float = 0.0
    ref_model_name_or_path: str = ""

    def validate(self) -> None:
        if self.beta <= 0:
            raise ConfigError("beta", f"must be positive, got {self.beta}")
        if not 0 <= self.label_smoothing < 0.5:
            raise ConfigError("label_smoothing", f"must be in [0, 0.5), got {self.label_smoothing}")
        if self.label_smoothing and self.loss_type != "sigmoid":
            raise ConfigError("label_smoothing", "applies to loss_type sigmoid only")


@dataclass(kw_only=True)
class RLOptions(OSFTConstraintOptions):
    """Online reinforcement learning: GRPO, RLOO, REINFORCE++, PPO, A2C and TRPO (see docs/online.md,
    docs/rl.md).

    One step generates ``num_generations`` completions for each of ``effective_batch_size /
    num_generations`` prompts from the current model, scores them with the reward functions, and makes
    ``num_iterations`` optimizer updates on them.

    Attributes:
        reward_functions: What scores a completion, summed with reward_weights: a shipped reward
            (exact_match, format_regex, overlong_penalty, reward_model, http, judge) by name or as a mapping with
            its options ({function: format_regex, pattern: ...}), or your own as module:function or
            path/to/file.py:function, called as fn(prompts, completions, **columns) -> list of float or None.
        reward_weights: One weight per reward function (empty: 1.0 each); with reward_model_path, one more
            for the reward model, last.
        reward_model_path: Folder or hub id of an AutoModelForSequenceClassification checkpoint (a single
            score, num_labels 1) whose score is one more reward, after reward_functions (the same as adding
            {function: reward_model, model: <path>} last). In a pipeline, stage:<name> names the reward model
            an earlier reward_model stage trains. Its tokenizer may differ from the policy's: the
            completion's text is re-tokenised with the reward model's own tokenizer and chat template.
        num_generations: Completions per prompt (a group); effective_batch_size counts completions and
            must be a multiple of it.
        max_new_tokens: Longest completion in tokens; longer ones stop there and count as truncated.
        temperature: Sampling temperature (> 0).
        top_p: Nucleus sampling: sample from the smallest set of tokens whose probability reaches top_p.
        top_k: Sample from the k most likely tokens (0: no limit).
        stop_strings: A completion ends after the first of these strings (as well as at end-of-sequence).
        mask_truncated_completions: Truncated completions (no end-of-sequence within max_new_tokens) get no
            loss; penalise them instead with the overlong_penalty reward.
        rollout_backend: What generates: hf (the training model itself, with a KV cache) or vllm (a colocated
            vLLM engine, GPU only, weights synced after each update; the vllm extra).
        vllm_gpu_memory_utilization: With rollout_backend vllm: the share of GPU memory the colocated engine
            may take (weights, KV cache); the rest is the trainer's.
        scale_rewards: Advantage scaling of grpo: group (divide by the group's reward std), batch (by the
            whole step's std) or none (mean-centred only, as Dr. GRPO).
        epsilon_low: Clip the probability ratio below at 1 - epsilon_low.
        epsilon_high: Clip the probability ratio above at 1 + epsilon_high (higher than epsilon_low:
            DAPO's clip-higher).
        loss_aggregation: token (every completion token of the step weighs the same), sequence (the mean
            over each completion's tokens, then over completions) or dr_grpo (the token sum over
            max_new_tokens times the completions).
        num_iterations: Passes over each step's completions, each of num_mini_batches optimizer updates
            (more than 1: the probability ratio to the generating policy moves away from 1 and clipping
            applies). Default: 4 for ppo, 1 otherwise (a2c and trpo need 1). Aliases: ppo_epochs,
            num_ppo_epochs.
        num_mini_batches: Optimizer updates per pass: the step's completions are split into this many
            mini-batches (reshuffled every pass); effective_batch_size must split evenly over them and the
            ranks. a2c needs 1.
        reinforce_pp_baseline: reinforce_pp only: none (REINFORCE++) or group (subtract each group's mean
            reward first, REINFORCE++ with a group baseline).
        kl_coef: Weight of the KL penalty to the reference model (the model training starts from; with
            LoRA the model without its adapter); 0 turns it off and no reference model is loaded.
        kl_in: Where the KL penalty goes: loss (the k3 estimate added to the loss, as GRPO) or reward (the
            kl_estimator estimate subtracted from every token's reward, as REINFORCE++ and PPO). Default:
            loss for grpo and rloo, reward for reinforce_pp, ppo, a2c and trpo.
        kl_estimator: The per-token KL estimate in the reward of ppo, a2c and trpo: k1 (log-ratio) or k3
            (exp(-d) + d - 1, never negative). reinforce_pp uses k1.
        kl_target: 0: kl_coef stays fixed; above 0: kl_coef adapts (proportional controller) to keep the
            KL per completion (summed over its tokens, in nats) near this target.
        kl_horizon: Completions over which the adaptive controller corrects (Ziegler et al.'s horizon;
            larger: slower changes). A step changes kl_coef by a factor within 1 +- 0.2 x completions /
            kl_horizon.
        value_model_init: ppo, a2c and trpo: what the separate value model (critic) starts from: policy (the
            policy's starting checkpoint with a new scalar head) or reward_model (reward_model_path's
            checkpoint, head included). See docs/rl.md.
        value_learning_rate: Peak learning rate of the value model's AdamW (0: learning_rate); it follows
            the policy's schedule (trpo: the policy has no learning rate, the schedule scales the value
            model's only).
        gamma: Discount of the token rewards in GAE (ppo, a2c, trpo).
        gae_lambda: GAE's lambda (1: Monte Carlo returns minus the values; 0: one-step TD).
        vf_coef: Weight of the value loss beside the policy loss. Default 0.1; a2c uses 0.5 when it is not
            set.
        value_clip: Clip the new values to within this distance of the values at generation in the value
            loss (PPO's clipped value loss; 0: no clipping). a2c does not clip.
        entropy_coef: Weight of the entropy bonus (subtracted from the loss; 0: none). a2c uses 0.01 when it
            is not set.
        early_stop_kl: ppo: stop a step's remaining passes once a pass's approximate KL to the generating
            policy (per token) is above this (0: never).
        reward_clip: ppo, a2c, trpo: clip each completion's score to [-reward_clip, reward_clip] (0: no clipping).
        whiten_rewards: ppo, a2c, trpo: scale the token rewards (score and KL) by their standard deviation over
            the step.
        missing_eos_penalty: ppo, a2c, trpo: subtracted from the score of a completion cut at max_new_tokens
            without an end of sequence.
        whiten_advantages: ppo, a2c, trpo: whiten the GAE advantages over every completion token of the step.
        max_kl: trpo: the trust region, the largest mean KL(old || new) per completion token (from full
            logits, in nats) that one policy step may reach (> 0; the delta of the TRPO paper).
        cg_iterations: trpo: conjugate-gradient iterations (Fisher-vector products) solving for the
            natural-gradient direction.
        cg_damping: trpo: added to the Fisher's diagonal (F + cg_damping I) to keep the solve stable.
        line_search_steps: trpo: candidates of the backtracking line search (the full step, then shrunk by
            line_search_shrink each time); when none keeps the KL within max_kl and improves the
            surrogate, the policy stays as it was.
        line_search_shrink: trpo: factor between line-search candidates, in (0, 1).
        value_epochs: trpo: passes of the value model's loss over each step's completions, after the
            policy's one natural-gradient step.
    """

    option_aliases: ClassVar[dict[str, str]] = {
        "ppo_epochs": "num_iterations",
        "num_ppo_epochs": "num_iterations",
    }

    reward_functions: list[str | dict[str, Any]] = field(default_factory=list)
    reward_weights: list[float] = field(default_factory=list)
    reward_model_path: str = ""
    num_generations: int = 8
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop_strings: list[str] = field(default_factory=list)
    mask_truncated_completions: bool = False
    rollout_backend: Literal["hf", "vllm"] = "hf"
    vllm_gpu_memory_utilization: float = 0.3
    scale_rewards: Literal["group", "batch", "none"] = "group"
    epsilon_low: float = 0.2
    epsilon_high: float = 0.2
    loss_aggregation: Literal["token", "sequence", "dr_grpo"] = "token"
    num_iterations: int | None = None
    num_mini_batches: int = 1
    reinforce_pp_baseline: Literal["none", "group"] = "none"
    kl_coef: float = 0.0
    kl_in: Literal["loss", "reward"] | None = None
    kl_estimator: Literal["k1", "k3"] = "k1"
    kl_target: float = 0.0
    kl_horizon: int = 10000
    value_model_init: Literal["policy", "reward_model"] = "policy"
    value_learning_rate: float = 0.0
    gamma: float = 1.0
    gae_lambda: float = 0.95
    vf_coef: float | None = None
    value_clip: float = 0.2
    entropy_coef: float | None = None
    early_stop_kl: float = 0.0
    reward_clip: float = 0.0
    whiten_rewards: bool = False
    missing_eos_penalty: float = 0.0
    whiten_advantages: bool = True

    max_kl: float = 0.01
    cg_iterations: int = 10
    cg_damping: float = 0.1
    line_search_steps: int = 10
    line_search_shrink: float = 0.5
    value_epochs: int = 5

    @property
    def all_reward_functions(self) -> list[str | dict[str, Any]]:
        """reward_functions, then reward_model_path's reward model when it is set."""
        extra: list[str | dict[str, Any]] = (
            [{"function": "reward_model", "model": self.reward_model_path}] if self.reward_model_path else []
        )
        return [*self.reward_functions, *extra]

    def validate(self) -> None:
        self._validate_trpo()
        _at_least(self, ("num_generations", "max_new_tokens", "num_mini_batches", "kl_horizon"), 1)
        if self.num_iterations is not None:
            _at_least(self, ("num_iterations",), 1)
        _at_least(self, ("top_k", "kl_coef", "kl_target", "epsilon_low", "epsilon_high"), 0)
        _at_least(
            self,
            ("value_learning_rate", "value_clip", "early_stop_kl", "reward_clip", "missing_eos_penalty"),
            0,
        )
        for name in ("vf_coef", "entropy_coef"):
            if getattr(self, name) is not None:
                _at_least(self, (name,), 0)
        for name in ("gamma", "gae_lambda"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(name, f"must be in [0, 1], got {getattr(self, name)}")
        if self.temperature <= 0:
            raise ConfigError("temperature", f"must be positive (sampling), got {self.temperature}")
        if not 0 < self.vllm_gpu_memory_utilization < 1:
            raise ConfigError(
                "vllm_gpu_memory_utilization", f"must be in (0, 1), got {self.vllm_gpu_memory_utilization}"
            )
        if not 0 < self.top_p <= 1:
            raise ConfigError("top_p", f"must be in (0, 1], got {self.top_p}")
        if self.epsilon_low >= 1:
            raise ConfigError(
                "epsilon_low", f"must be below 1 (the ratio clips at 1 - epsilon_low), got {self.epsilon_low}"
            )
        if self.reward_functions or self.reward_weights or self.reward_model_path:
            from kfp_components.rewards import parse_references  # light: no torch, nothing loaded

            if self.reward_weights and len(self.reward_weights) != len(self.all_reward_functions):
                what = f"{len(self.reward_functions)} reward function(s)"
                if self.reward_model_path:
                    what += " and the reward model of reward_model_path (its weight last)"
                raise ConfigError(
                    "reward_weights",
                    f"{len(self.reward_weights)} weight(s) for {what}: give one weight for each",
                )
            parse_references(self.all_reward_functions, self.reward_weights or None)
        for i, stop in enumerate(self.stop_strings):
            if not isinstance(stop, str) or not stop:
                raise ConfigError(f"stop_strings[{i}]", f"expected a non-empty string, got {stop!r}")
        if self.kl_target and not self.kl_coef:
            raise ConfigError("kl_target", "adapts kl_coef, which is 0 (KL off); set an initial kl_coef")

    def _validate_trpo(self) -> None:
        if not self.max_kl > 0:
            raise ConfigError(
                "max_kl",
                f"the trust region (delta) must be positive, got {self.max_kl}; trpo's default is 0.01",
            )
        _at_least(self, ("cg_iterations", "line_search_steps", "value_epochs"), 1)
        _at_least(self, ("cg_damping",), 0)
        if not 0 < self.line_search_shrink < 1:
            raise ConfigError("line_search_shrink", f"must be in (0, 1), got {self.line_search_shrink}")


@dataclass(kw_only=True)
class RewardModelTrainingOptions(Options):
    """Reward-model training (``algorithm: reward_model``): a scalar head on a causal LM learns from
    preference pairs with the Bradley-Terry loss ``-log sigmoid(r_chosen - r_rejected - margin)``, the
    margin read per pair from the rows' optional ``margin`` column (0 when absent). See docs/rl.md.

    Attributes:
        center_rewards_coef: Weight of the centering term ``coef * (r_chosen + r_rejected)^2`` per pair
            (Eisenstein et al. 2023), which keeps the scores near 0; 0: off.
    """

    center_rewards_coef: float = 0.0

    def validate(self) -> None:
        _at_least(self, ("center_rewards_coef",), 0)


@dataclass(kw_only=True)
class DistillationOptions(Options):
    """Logit distillation (sft and osft): the student also learns the token distribution of a frozen local
    teacher that shares its tokenizer. See docs/trainer.md.

    Attributes:
        distill_teacher_path: Folder or hub id of a causal LM with the student's vocabulary (the same
            tokenizer vocabulary and logits width); empty: no distillation.
        distill_coef: The loss is (1 - distill_coef) * SFT loss + distill_coef * KD loss, in [0, 1].
        distill_temperature: Softmax temperature of both distributions (> 0); the KD loss of a loss token is
            T^2 * KL(teacher_T || student_T) (forward KL), averaged like the SFT loss.
    """

    distill_teacher_path: str = ""
    distill_coef: float = 0.5
    distill_temperature: float = 1.0

    def validate(self) -> None:
        if not 0 <= self.distill_coef <= 1:
            raise ConfigError("distill_coef", f"must be in [0, 1], got {self.distill_coef}")
        if not self.distill_temperature > 0:
            raise ConfigError("distill_temperature", f"must be positive, got {self.distill_temperature}")


#: Experiment trackers the metrics can be reported to.
ReportTo = Literal["tensorboard", "mlflow"]
REPORT_TO: tuple[str, ...] = get_args(ReportTo)


@dataclass(kw_only=True)
class TrackingOptions(Options):
    """Where every record of ``metrics.jsonl`` is also reported (main process only). See docs/trainer.md.

    Attributes:
        report_to: Experiment trackers: tensorboard (event files in ``<output_dir>/tensorboard``) and/or
            mlflow (params and metrics to the tracking server of ``MLFLOW_TRACKING_URI``, which must be
            set; the experiment of ``MLFLOW_EXPERIMENT_NAME``, else the server's default); [] for none.
        run_name: The run's name in the trackers (the training step sets the pipeline run's id and the
            stage); empty: the output folder's name.
    """

    report_to: list[ReportTo] = field(default_factory=lambda: ["tensorboard"])
    run_name: str = ""

    def validate(self) -> None:
        for i, name in enumerate(self.report_to):
            if name not in REPORT_TO:
                raise ConfigError(f"report_to[{i}]", f"expected one of {', '.join(REPORT_TO)}, got {name!r}")
        repeated = sorted({name for name in self.report_to if self.report_to.count(name) > 1})
        if repeated:
            raise ConfigError("report_to", f"{', '.join(repeated)} is listed more than once")


#: Options every run must set.
REQUIRED = ("model_name_or_path", "data_path", "output_dir")


def algorithm_defaults(algorithm: str) -> dict[str, Any]:
    """The values of the per-algorithm options (``None`` in the classes) for ``algorithm``."""
    return {
        "num_iterations": 4 if algorithm == "ppo" else 1,
        "kl_in": "loss" if algorithm in ("grpo", "rloo") else "reward",
        "vf_coef": 0.5 if algorithm == "a2c" else 0.1,
        "entropy_coef": 0.01 if algorithm == "a2c" else 0.0,
    }


@dataclass(kw_only=True)
class TrainingConfig(
    OptimOptions,
    OSFTOptions,
    LoRAOptions,
    DPOOptions,
    RewardModelTrainingOptions,
    RLOptions,
    DistillationOptions,
    TrackingOptions,
):
    """Options of one training run: the model, the data, where outputs go, the method, and every option of
    :class:`OptimOptions`, :class:`OSFTOptions`, :class:`LoRAOptions`, :class:`DPOOptions`,
    :class:`RewardModelTrainingOptions`, :class:`RLOptions`, :class:`DistillationOptions` and
    :class:`TrackingOptions`.

    Attributes:
        model_name_or_path: Hugging Face model id or local folder of the starting checkpoint.
        data_path: JSONL file from the dataset stage: `messages` rows (an optional numeric weight per row
            scales its loss) for sft and osft, `preference` rows
            (prompt, chosen, rejected; reward_model also reads an optional margin) for dpo and reward_model,
            `prompt` rows (prompt, optional answer and other columns
            for the reward functions) for grpo, rloo and reinforce_pp.
        output_dir: Where checkpoints, metrics and the final model go (final model in ``<output_dir>/final``).
        algorithm: sft (full fine-tuning, or LoRA when lora_r > 0), osft (Orthogonal Subspace Fine-Tuning),
            dpo (Direct Preference Optimization), reward_model (a scalar-head reward model trained on
            preference pairs, saved as an AutoModelForSequenceClassification checkpoint), or the online
            algorithms grpo (Group Relative Policy Optimization), rloo (REINFORCE Leave-One-Out),
            reinforce_pp (REINFORCE++), and with a value model ppo (Proximal Policy Optimization) and a2c
            (Advantage Actor-Critic), and trpo (Trust Region Policy Optimization, with a value model too;
            its options: max_kl and the ones after it in RLOptions).
        eval_data_path: Optional JSONL in the same format as data_path: its loss is computed at the end of
            every epoch (and every eval_steps) and reported as eval_loss (reward_model: eval_accuracy and
            eval_margin too).
    """

    model_name_or_path: str
    data_path: str
    output_dir: str
    algorithm: Algorithm = "sft"
    eval_data_path: str = ""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.resolve_algorithm_defaults()

    def resolve_algorithm_defaults(self) -> None:
        """Fill the options whose default depends on the algorithm (None: not set): ``num_iterations`` (ppo
        4, else 1), ``kl_in`` (loss for grpo and rloo, else reward), ``vf_coef`` (a2c 0.5, else 0.1) and
        ``entropy_coef`` (a2c 0.01, else 0)."""
        defaults = algorithm_defaults(self.algorithm)
        for name, value in defaults.items():
            if getattr(self, name) is None:
                setattr(self, name, value)

    def validate(self) -> None:
        """Raise :class:`ConfigError` listing the bad options (the first problem of each option group)."""
        problems = [(name, "required option is empty") for name in REQUIRED if not getattr(self, name)]
        for check in (
            OptimOptions.validate,
            OSFTOptions.validate,
            LoRAOptions.validate,
            DPOOptions.validate,
            RewardModelTrainingOptions.validate,
            RLOptions.validate,
            DistillationOptions.validate,
            TrackingOptions.validate,
            TrainingConfig._check_combinations,
            TrainingConfig._check_trpo,
        ):
            try:
                check(self)
            except ConfigError as exc:
                problems.extend(exc.problems)
        if problems:
            raise ConfigError.of(problems)

    def _check_combinations(self) -> None:
        if self.data_format == "text" and self.algorithm not in ("sft", "osft"):
            raise ConfigError(
                "data_format",
                f"text rows train sft and osft, not {self.algorithm}; leave data_format: messages",
            )
        if self.algorithm == "osft" and self.lora_r:
            raise ConfigError("lora_r", "LoRA and OSFT are alternatives; set lora_r to 0 for osft")
        if self.algorithm == "reward_model" and self.osft_constraint:
            raise ConfigError("osft_constraint", "applies to dpo and the online algorithms, not reward_model")
        if self.algorithm == "reward_model" and self.qlora:
            raise ConfigError("qlora", "reward_model trains with full weights or LoRA, not QLoRA")
        if self.eval_steps and not self.eval_data_path:
            raise ConfigError("eval_steps", "needs eval data (eval_data_path)")
        if self.algorithm in ("dpo", *RL_ALGORITHMS) and self.osft_constraint and self.lora_r:
            raise ConfigError("lora_r", "osft_constraint and LoRA are alternatives; set lora_r to 0")
        if self.is_online:
            self._check_online()
        if self.distill_teacher_path:
            self._check_distillation()

    def _check_distillation(self) -> None:
        if self.algorithm not in ("sft", "osft"):
            raise ConfigError(
                "distill_teacher_path",
                f"logit distillation applies to algorithm sft and osft, not {self.algorithm}; leave "
                "distill_teacher_path empty",
            )
        if self.use_liger:
            raise ConfigError(
                "use_liger",
                "Liger's fused cross-entropy never materialises the student's logits, which logit "
                "distillation (distill_teacher_path) compares with the teacher's; set use_liger: false",
            )

    def _check_online(self) -> None:
        if not self.all_reward_functions:
            raise ConfigError(
                "reward_functions",
                f"{self.algorithm} needs something to learn from: at least one reward function, or a reward "
                "model (reward_model_path)",
            )
        if self.effective_batch_size % self.num_generations:
            raise ConfigError(
                "effective_batch_size",
                f"{self.effective_batch_size} completions per step is not a multiple of num_generations "
                f"{self.num_generations} (each prompt gets a whole group)",
            )
        group_needed = self.algorithm in ("grpo", "rloo") or self.reinforce_pp_baseline == "group"
        if group_needed and self.num_generations < 2:
            what = "reinforce_pp_baseline: group" if self.algorithm == "reinforce_pp" else self.algorithm
            raise ConfigError(
                "num_generations",
                f"{what} compares the completions of one prompt with each other and needs at least 2 per "
                f"prompt, got {self.num_generations}",
            )
        if self.max_new_tokens >= self.max_seq_len:
            raise ConfigError(
                "max_new_tokens",
                f"{self.max_new_tokens} leaves no room for the prompt within max_seq_len {self.max_seq_len}",
            )
        if self.eval_data_path:
            raise ConfigError(
                "eval_data_path",
                f"{self.algorithm} reports the reward of every step; an eval loss applies to sft, osft and dpo",
            )
        parts = self.num_mini_batches
        if self.effective_batch_size % parts or (self.effective_batch_size // parts) < 1:
            raise ConfigError(
                "num_mini_batches",
                f"{parts} mini-batches do not split effective_batch_size {self.effective_batch_size} evenly",
            )
        if self.algorithm in VALUE_ALGORITHMS:
            self._check_value_algorithm()

    def _check_value_algorithm(self) -> None:
        if self.algorithm == "a2c":
            for name in ("num_iterations", "num_mini_batches"):
                if getattr(self, name) != 1:
                    raise ConfigError(
                        name,
                        f"a2c makes one update per rollout batch: {name} must be 1, got {getattr(self, name)} "
                        "(use ppo for several updates per batch)",
                    )
        if self.value_model_init == "reward_model" and not self.reward_model_path:
            raise ConfigError(
                "value_model_init", "reward_model needs reward_model_path (the reward model to start from)"
            )
        if self.torch_dtype == "float16":
            raise ConfigError(
                "torch_dtype",
                f"{self.algorithm} trains a value model beside the policy, which float16 loss scaling does "
                "not cover; use bfloat16 or float32",
            )

    def _check_trpo(self) -> None:
        if self.algorithm != "trpo":
            return
        # distributed: fsdp (the default) is refused where the world size is known (train: several
        # processes); one process ignores it.
        if self.attn_implementation not in ("auto", "sdpa_per_sample", "sdpa", "eager"):
            raise ConfigError(
                "attn_implementation",
                f"{self.attn_implementation} has no double backward, which trpo's Fisher-vector products "
                "need: use auto or sdpa_per_sample (sdpa per sample, on its math kernel for them), sdpa or "
                "eager",
            )
        if self.num_iterations != 1:
            raise ConfigError(
                "num_iterations",
                f"trpo takes one natural-gradient step per step's completions, got {self.num_iterations}; "
                "the value model's passes are value_epochs",
            )
        if self.kl_coef and self.kl_in == "loss":
            raise ConfigError(
                "kl_in", "trpo's surrogate has no KL term: the KL penalty goes in the reward (kl_in: reward)"
            )
        for name in ("entropy_coef", "early_stop_kl"):
            if getattr(self, name):
                raise ConfigError(
                    name,
                    f"trpo's policy step is the natural-gradient step within max_kl, without {name}; set it "
                    "to 0",
                )

    @property
    def is_online(self) -> bool:
        """Whether the algorithm learns from the model's own generations (grpo, rloo, reinforce_pp)."""
        return self.algorithm in RL_ALGORITHMS

    @property
    def uses_osft(self) -> bool:
        """OSFT itself, or DPO or an online algorithm inside the OSFT constraint."""
        return self.algorithm == "osft" or (
            self.algorithm in ("dpo", *RL_ALGORITHMS) and self.osft_constraint
        )
