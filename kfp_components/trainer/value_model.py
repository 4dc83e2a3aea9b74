"""The value model (critic) of ppo, a2c and trpo: a separate model with a scalar head, a value per token.

:class:`ValueModel` is a causal LM's backbone (``model``, as in ``AutoModelForSequenceClassification``) and
a linear head (``score``, hidden size -> 1) applied at every position: ``values[t]`` estimates the return
from the state made of the tokens up to ``t``. Its parameter names are those of the sequence-classification
model it comes from, so its state dict is one (``AutoModelForSequenceClassification`` with one label loads
it). It runs on the packed, padding-free micro-batches of the policy (``position_ids`` restarting at every
sample), in the same precision.

It starts from (``value_model_init``):

* ``policy`` (default): the policy's starting checkpoint, the head new (normal, std ``initializer_range``,
  drawn from a generator seeded by ``seed``, so every rank and every resume builds the same);
* ``reward_model``: ``reward_model_path``'s sequence-classification checkpoint, head included (one label;
  its tokenizer must be the policy's, since it reads the policy's token ids).

With LoRA on the policy (``lora_r > 0``) the critic gets LoRA adapters of the same shape on its backbone,
and its head trains in full. :class:`Critic` holds it wrapped for DDP/FSDP2 with its own AdamW
(``value_learning_rate``, the policy's schedule) and makes its updates.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from kfp_components.trainer import attention
from kfp_components.trainer.config import TrainingConfig
from kfp_components.trainer.distributed import DistInfo, wrap_model
from kfp_components.typed_config import ConfigError

log = logging.getLogger("kfp_components.trainer")

#: Attribute names of the scalar head in transformers' sequence-classification models.
HEAD_NAMES = ("score", "classifier")


class ValueModel(nn.Module):
    """A backbone and a scalar head: ``forward(input_ids, position_ids) -> (batch, T)`` values in float32."""

    def __init__(self, backbone: nn.Module, head: nn.Module, config: Any):
        super().__init__()
        self.model = backbone
        self.score = head
        self.config = config

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        hidden = self.model(input_ids=input_ids, position_ids=position_ids, use_cache=False).last_hidden_state
        return self.score(hidden).squeeze(-1).float()

    @classmethod
    def from_classifier(cls, classifier: nn.Module) -> ValueModel:
        """The backbone and head of a transformers ``...ForSequenceClassification`` model with one label."""
        prefix = getattr(classifier, "base_model_prefix", "model")
        backbone = getattr(classifier, prefix, None)
        head = next((getattr(classifier, name) for name in HEAD_NAMES if hasattr(classifier, name)), None)
        if backbone is None or head is None:
            raise ValueError(f"{type(classifier).__name__} has no backbone ({prefix}) or scalar head")
        out_features = getattr(head, "out_features", None)
        if out_features != 1:
            raise ValueError(f"the value head must give one number per token; this one gives {out_features}")
        return cls(backbone, head, classifier.config)


def load_value_model(config: TrainingConfig, info: DistInfo, tokenizer: Any = None) -> ValueModel:
    """The critic in float32 on this rank's device, from the policy's checkpoint or the reward model's."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from kfp_components.trainer.preflight import model_source
    from kfp_components.trainer.progress import no_transformers_progress_bars

    from_reward_model = config.value_model_init == "reward_model"
    path = config.reward_model_path if from_reward_model else config.model_name_or_path
    if from_reward_model and tokenizer is not None:
        theirs = AutoTokenizer.from_pretrained(model_source(path))
        if theirs.get_vocab() != tokenizer.get_vocab():
            raise ConfigError(
                "value_model_init",
                f"reward_model: the tokenizer of {path} is not the policy's; the value model reads the "
                "policy's token ids, so start it from the policy (value_model_init: policy)",
            )
    kwargs: dict[str, Any] = {
        "dtype": torch.float32,
        "attn_implementation": attention.implementation(config, info.device),
    }
    if not from_reward_model:
        kwargs["num_labels"] = 1
    # the new head's draws come from the run's seed, without touching the global generator
    with torch.random.fork_rng(devices=[]), no_transformers_progress_bars():
        torch.manual_seed(config.seed)
        classifier = AutoModelForSequenceClassification.from_pretrained(model_source(path), **kwargs)
        if not from_reward_model:
            std = float(getattr(classifier.config, "initializer_range", 0.02))
            head = next(getattr(classifier, name) for name in HEAD_NAMES if hasattr(classifier, name))
            generator = torch.Generator().manual_seed(config.seed)
            with torch.no_grad():
                head.weight.copy_(torch.randn(head.weight.shape, generator=generator) * std)
                if getattr(head, "bias", None) is not None:
                    head.bias.zero_()
    try:
        model = ValueModel.from_classifier(classifier)
    except ValueError as exc:
        raise ConfigError(
            "reward_model_path" if from_reward_model else "model_name_or_path", str(exc)
        ) from None
    if config.lora_r:
        _add_lora(model, config)
    enable_checkpointing = getattr(model.model, "gradient_checkpointing_enable", None)
    if config.activation_checkpointing and callable(enable_checkpointing):
        enable_checkpointing(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.to(info.device)


def _add_lora(model: ValueModel, config: TrainingConfig) -> None:
    """LoRA adapters on the backbone, shaped like the policy's; the head trains in full."""
    from peft import LoraConfig, inject_adapter_in_model

    targets = config.lora_target_modules
    lora = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=targets[0] if targets == ["all-linear"] else targets,
    )
    model.model.requires_grad_(False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed + 1)
        model.model = inject_adapter_in_model(lora, model.model)
    for name, parameter in model.model.named_parameters():
        parameter.requires_grad_("lora_" in name)
    model.score.requires_grad_(True)


class Critic:
    """The value model of a run, wrapped like the policy (DDP or FSDP2), with its own AdamW.

    Its learning rate follows the policy's schedule: each update uses ``value_learning_rate`` times the
    factor the schedule gives the policy's update (the policy's LR over ``learning_rate``), so nothing of
    the schedule needs saving beside the policy's.
    """

    def __init__(self, model: ValueModel, config: TrainingConfig, info: DistInfo):
        self.config = config
        self.info = info
        self.module = wrap_model(model, info, config.distributed, bf16=False)
        self.trainable = [p for p in self.module.parameters() if p.requires_grad]
        self.learning_rate = config.value_learning_rate or config.learning_rate
        self.optimizer = torch.optim.AdamW(
            self.trainable,
            lr=self.learning_rate,
            betas=(config.adam_beta1, config.adam_beta2),
            eps=config.adam_epsilon,
            weight_decay=config.weight_decay,
        )

    @property
    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.trainable)

    def values(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """Per-token values ``(T,)`` of a packed row (``(1, T)`` inputs), differentiable."""
        device = self.info.device
        return self.module(input_ids=input_ids.to(device), position_ids=position_ids.to(device)).reshape(-1)

    def step(self, lr_scale: float) -> float:
        """One AdamW update from the accumulated gradients at ``lr_scale`` x its learning rate (the policy's
        schedule factor); clips to ``max_grad_norm``; returns the gradient norm."""
        for group in self.optimizer.param_groups:
            group["lr"] = self.learning_rate * lr_scale
        limit = self.config.max_grad_norm if self.config.max_grad_norm > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self.trainable, limit)
        if hasattr(norm, "full_tensor"):  # a DTensor under FSDP2
            norm = norm.full_tensor()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)


def build_critic(config: TrainingConfig, info: DistInfo, tokenizer: Any = None) -> Critic:
    """Load the value model (see the module's description) and wrap it; logs its size once."""
    critic = Critic(load_value_model(config, info, tokenizer), config, info)
    if info.is_main:
        log.info(
            "value model: from %s, %d trainable parameters, learning rate %g",
            config.reward_model_path if config.value_model_init == "reward_model" else "the policy",
            critic.num_trainable,
            critic.learning_rate,
        )
    return critic
