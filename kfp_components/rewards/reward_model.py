"""A reward model: any ``AutoModelForSequenceClassification`` checkpoint scores prompt + completion.

The pair is rendered with the reward model's own chat template when its tokenizer has one (the prompt's
messages, or the prompt text as one user message, then the completion as the assistant's message); without a
template the tokenizer encodes the pair as a text pair (``prompt``, ``completion``) the way classic reward
models were trained, a messages prompt joined to one text. The score is the logit of the model's single label
(``num_labels: 1``), or of ``label_index`` when it has several. Samples are scored in batches of
``batch_size``, sorted by length to keep padding small, under ``torch.inference_mode`` on ``device``.

The reward model reads text, never the policy's token ids: when its tokenizer differs from the policy's
(another vocabulary or chat template), the completion's text is re-tokenised with the reward model's own
tokenizer and template; this is logged once per reward model (:func:`tokenizer_difference` says how they
differ). :func:`reward_model_problems` checks a checkpoint without loading its weights: a single score
(``num_labels: 1``, or a ``label_index``) and a tokenizer.

torch and transformers are imported when a reward model is loaded, never when this package is imported.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from kfp_components.typed_config import ConfigError, Options

log = logging.getLogger(__name__)
#: Reward models whose re-tokenisation has been logged in this process.
_ANNOUNCED: set[str] = set()


def tokenizer_difference(reward_tokenizer: Any, policy_tokenizer: Any) -> str:
    """How the reward model's tokenizer differs from the policy's ("" when they are the same): either may be
    a tokenizer or a reference (folder or hub id) to load one from."""
    from transformers import AutoTokenizer

    reward = (
        AutoTokenizer.from_pretrained(reward_tokenizer)
        if isinstance(reward_tokenizer, str)
        else reward_tokenizer
    )
    policy = (
        AutoTokenizer.from_pretrained(policy_tokenizer)
        if isinstance(policy_tokenizer, str)
        else policy_tokenizer
    )
    differences = []
    if reward.get_vocab() != policy.get_vocab():
        differences.append("vocabulary")
    if getattr(reward, "chat_template", None) != getattr(policy, "chat_template", None):
        differences.append("chat template")
    if not differences:
        return ""
    return (
        f"its tokenizer differs from the policy's ({' and '.join(differences)}): each completion's text is "
        "re-tokenised with the reward model's tokenizer"
    )


def reward_model_problems(model: str, *, label_index: int | None = None) -> list[str]:
    """What makes ``model`` unusable as a reward model, found from its config and tokenizer alone (no
    weights): not loadable, not a single score (``num_labels`` other than 1 without ``label_index``)."""
    from transformers import AutoConfig, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(model)
        AutoTokenizer.from_pretrained(model)
    except Exception as exc:
        return [f"{model}: cannot be loaded: {type(exc).__name__}: {exc}"]
    architectures = list(getattr(config, "architectures", None) or [])
    if not any(name.endswith("ForSequenceClassification") for name in architectures):
        return [
            f"{model} is not a sequence-classification checkpoint (architectures: "
            f"{', '.join(architectures) or 'none'}); train one with algorithm: reward_model"
        ]
    labels = int(config.num_labels)
    if label_index is None and labels != 1:
        return [f"{model} has {labels} labels, not a single score; set label_index (0 to {labels - 1})"]
    if label_index is not None and label_index >= labels:
        return [f"label_index {label_index} is out of range: {model} has {labels} labels"]
    return []


@dataclass
class RewardModelOptions(Options):
    """Options of the shipped ``reward_model`` reward.

    Attributes:
        function: ``reward_model``.
        model: Folder or Hugging Face name of an ``AutoModelForSequenceClassification`` checkpoint.
        name: Name in metrics; default ``reward_model``.
        label_index: Which logit is the score; empty: the model must have a single label.
        batch_size: Samples per forward pass.
        max_length: Longest input in tokens; longer inputs keep their last ``max_length`` tokens (the score
            is read at the end). 0: no limit.
        device: Device of the reward model (``cpu``, ``cuda:0``); empty: the trainer's device.
        dtype: Weights' dtype: ``float32``, ``bfloat16``, ``float16``, or ``auto`` (as saved).
    """

    model: str
    function: Literal["reward_model"] = "reward_model"
    name: str = ""
    label_index: int | None = None
    batch_size: int = 8
    max_length: int = 0
    device: str = ""
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "float32"

    def validate(self) -> None:
        if not self.model.strip():
            raise ConfigError("model", "must name a sequence-classification checkpoint")
        if self.batch_size < 1:
            raise ConfigError("batch_size", f"must be at least 1, got {self.batch_size}")
        if self.max_length < 0:
            raise ConfigError("max_length", f"must be 0 (no limit) or positive, got {self.max_length}")
        if self.label_index is not None and self.label_index < 0:
            raise ConfigError("label_index", f"must not be negative, got {self.label_index}")


class RewardModelReward:
    """Scores with a sequence-classification model (see the module docstring)."""

    def __init__(self, options: RewardModelOptions, device: str = "cpu", policy_tokenizer: Any = None):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.options = options
        self.device = torch.device(options.device or device)
        self.tokenizer = AutoTokenizer.from_pretrained(options.model)
        dtype = "auto" if options.dtype == "auto" else getattr(torch, options.dtype)
        model = AutoModelForSequenceClassification.from_pretrained(options.model, dtype=dtype)
        labels = int(model.config.num_labels)
        if options.label_index is None and labels != 1:
            raise ValueError(
                f"{options.model} has {labels} labels; set label_index (0 to {labels - 1}) to pick the score"
            )
        if options.label_index is not None and options.label_index >= labels:
            raise ValueError(
                f"label_index {options.label_index} is out of range: {options.model} has {labels}"
            )
        self.label_index = options.label_index or 0
        pad_id = model.config.pad_token_id
        if pad_id is None:
            pad_id = self.tokenizer.pad_token_id
            if pad_id is None:
                pad_id = self.tokenizer.eos_token_id
            if pad_id is None:
                raise ValueError(f"{options.model} has no pad or EOS token to pad a batch with")
            model.config.pad_token_id = pad_id
        self.pad_id = int(pad_id)
        self.model = model.to(self.device).eval()
        self.has_template = bool(getattr(self.tokenizer, "chat_template", None))
        #: how the reward model's tokenizer differs from the policy's ("" when the same or not known)
        self.retokenises = tokenizer_difference(self.tokenizer, policy_tokenizer) if policy_tokenizer else ""
        if self.retokenises and options.model not in _ANNOUNCED:
            _ANNOUNCED.add(options.model)
            log.info("reward model %s: %s", options.model, self.retokenises)

    def encode(self, prompt: Any, completion: str) -> list[int]:
        """The token ids the model reads for one sample."""
        if self.has_template:
            messages = (
                list(prompt) if isinstance(prompt, list) else [{"role": "user", "content": str(prompt)}]
            )
            messages.append({"role": "assistant", "content": completion})
            text = self.tokenizer.apply_chat_template(messages, tokenize=False)
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            if isinstance(prompt, list):
                prompt = "\n\n".join(str(m.get("content", "")) for m in prompt if isinstance(m, dict))
            ids = self.tokenizer(str(prompt), completion)["input_ids"]
        if self.options.max_length and len(ids) > self.options.max_length:
            ids = ids[-self.options.max_length :]
        return list(ids)

    def __call__(self, prompts: Sequence[Any], completions: Sequence[str], **_: Any) -> list[float | None]:
        import torch

        encoded = [self.encode(p, c) for p, c in zip(prompts, completions, strict=True)]
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]), reverse=True)
        scores: list[float | None] = [None] * len(encoded)
        size = self.options.batch_size
        with torch.inference_mode():
            for start in range(0, len(order), size):
                batch = order[start : start + size]
                longest = max(len(encoded[i]) for i in batch)
                input_ids = torch.full((len(batch), longest), self.pad_id, dtype=torch.long)
                attention = torch.zeros((len(batch), longest), dtype=torch.long)
                for row, i in enumerate(batch):
                    input_ids[row, : len(encoded[i])] = torch.tensor(encoded[i], dtype=torch.long)
                    attention[row, : len(encoded[i])] = 1
                logits = self.model(
                    input_ids=input_ids.to(self.device), attention_mask=attention.to(self.device)
                ).logits
                values = logits[:, self.label_index].float().cpu().tolist()
                for i, value in zip(batch, values, strict=True):
                    scores[i] = float(value)
        return scores
