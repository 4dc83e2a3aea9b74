"""The ``local`` judge backend: a Hugging Face causal LM on the trainer's device, batched, never sampling.

Conversations are rendered with the model's chat template and its generation prompt (a local judge must have
one: it is how an instruction-tuned judge expects its requests). :meth:`LocalJudgeModel.replies` decodes
greedily (``generate`` with ``do_sample=False``) in batches of ``batch_size``, left-padded.
:meth:`LocalJudgeModel.label_probabilities` runs one forward pass per batch and reads the next-token
distribution after the generation prompt: each label (a score's digits, a pairwise answer "A"/"B") must be a
single token of the judge's vocabulary, and its probability is renormalised over the labels asked for.

torch and transformers are imported when the model loads.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from kfp_components.feedback.judges import JudgeBackend


class LocalJudgeModel(JudgeBackend):
    """A causal LM that judges (see the module docstring)."""

    def __init__(self, model: str, *, device: str = "cpu", dtype: str = "float32", batch_size: int = 8):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.name = model
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.tokenizer = AutoTokenizer.from_pretrained(model)
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(
                f"{model}: the tokenizer has no chat template; a local judge renders its requests with one"
            )
        weights = "auto" if dtype == "auto" else getattr(torch, dtype)
        loaded = AutoModelForCausalLM.from_pretrained(model, dtype=weights)
        self.model = loaded.to(self.device).eval()  # type: ignore[arg-type]
        self.model.requires_grad_(False)
        pad = self.tokenizer.pad_token_id
        if pad is None:
            pad = self.tokenizer.eos_token_id
        if pad is None:
            raise ValueError(f"{model}: the tokenizer has no pad or EOS token to pad a batch with")
        self.pad_id = int(pad)
        self._label_ids: dict[str, int] = {}
        self._requests = 0
        self._seconds = 0.0

    def usage(self) -> dict[str, float]:
        """Conversations judged and the seconds spent on them."""
        return {"requests": float(self._requests), "latency_seconds": self._seconds}

    def check(self) -> None:
        """Loaded in the constructor: nothing more to check."""

    def label_id(self, label: str) -> int:
        """The token id of ``label``; a :class:`ValueError` when it is not exactly one token."""
        if label not in self._label_ids:
            ids = self.tokenizer(label, add_special_tokens=False)["input_ids"]
            if len(ids) != 1:
                raise ValueError(
                    f"{self.name}: {label!r} is {len(ids)} tokens in the judge's tokenizer; reading its "
                    "probability needs a single token (choose labels, or a score scale, whose items are one token)"
                )
            self._label_ids[label] = int(ids[0])
        return self._label_ids[label]

    def _encode(self, conversations: Sequence[list[dict[str, str]]]) -> list[list[int]]:
        texts = self.tokenizer.apply_chat_template(
            [list(c) for c in conversations], tokenize=False, add_generation_prompt=True
        )
        return [list(self.tokenizer(text, add_special_tokens=False)["input_ids"]) for text in texts]

    def _batches(self, encoded: list[list[int]]) -> list[tuple[list[int], Any, Any]]:
        """Left-padded batches of ``batch_size`` rows: (row indices, input ids, attention mask)."""
        import torch

        batches = []
        for start in range(0, len(encoded), self.batch_size):
            rows = list(range(start, min(start + self.batch_size, len(encoded))))
            longest = max(len(encoded[i]) for i in rows)
            ids = torch.full((len(rows), longest), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(rows), longest), dtype=torch.long)
            for r, i in enumerate(rows):
                ids[r, longest - len(encoded[i]) :] = torch.tensor(encoded[i], dtype=torch.long)
                mask[r, longest - len(encoded[i]) :] = 1
            batches.append((rows, ids.to(self.device), mask.to(self.device)))
        return batches

    def replies(self, conversations: Sequence[list[dict[str, str]]], max_tokens: int) -> list[str | None]:
        import torch

        replies: list[str | None] = [None] * len(conversations)
        started = time.perf_counter()
        with torch.inference_mode():
            for rows, ids, mask in self._batches(self._encode(conversations)):
                out = self.model.generate(
                    input_ids=ids,
                    attention_mask=mask,
                    do_sample=False,
                    max_new_tokens=max_tokens,
                    pad_token_id=self.pad_id,
                )
                for r, i in enumerate(rows):
                    replies[i] = str(self.tokenizer.decode(out[r, ids.shape[1] :], skip_special_tokens=True))
        self._requests += len(conversations)
        self._seconds += time.perf_counter() - started
        return replies

    def label_probabilities(
        self, conversations: Sequence[list[dict[str, str]]], labels: Sequence[str]
    ) -> list[list[float]]:
        import torch

        label_ids = torch.tensor([self.label_id(label) for label in labels], device=self.device)
        result: list[list[float]] = [[] for _ in conversations]
        started = time.perf_counter()
        with torch.inference_mode():
            for rows, ids, mask in self._batches(self._encode(conversations)):
                positions = (mask.cumsum(-1) - 1).clamp(min=0)
                logits = self.model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1]
                chosen = torch.log_softmax(logits.float(), dim=-1)[:, label_ids]
                probabilities = torch.softmax(chosen, dim=-1).cpu().tolist()
                for r, i in enumerate(rows):
                    result[i] = probabilities[r]
        self._requests += len(conversations)
        self._seconds += time.perf_counter() - started
        return result

    def close(self) -> None:
        del self.model
