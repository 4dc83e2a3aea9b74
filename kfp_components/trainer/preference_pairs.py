"""What DPO and reward-model training share about preference pairs: reading and tokenising
``{"prompt", "chosen", "rejected", ...}`` rows, and the pair-per-sample side of their objectives.

Both render a row the same way (the chat template, each completion as the assistant's turn after the prompt),
cut or drop pairs longer than ``max_seq_len`` alike, and count a pair as one sample of the token-budget
sampler (its length the tokens of both sequences, one loss unit). What each keeps of a row (DPO: the two
sequences; reward model: also the score positions and the margin) and when a pair has no trainable label stay
with each algorithm.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from kfp_components.trainer.batching import MicroBatch
from kfp_components.trainer.tokenize import SampleError, TokenizedSample, tokenize_prompt_completion


def messages(value: Any, role: str) -> list[dict]:
    """A message list: a plain string becomes one message of ``role``."""
    return [{"role": role, "content": value}] if isinstance(value, str) else list(value)


def _no_check(row: dict) -> None:
    return None


def tokenized_preference_rows(
    path: str | Path,
    tokenizer: Any,
    *,
    max_seq_len: int,
    overlong: str,
    stats: dict[str, float],
    check_row: Callable[[dict], object] = _no_check,
) -> Iterator[tuple[dict, list[TokenizedSample]]]:
    """Each non-blank row of ``path`` with its ``[chosen, rejected]`` tokenised sequences.

    ``check_row`` runs on the parsed row before tokenising (its ``ValueError`` is the row's error). A row that
    cannot be read or rendered raises :class:`SampleError` naming ``path:line``. A pair whose longer sequence
    exceeds ``max_seq_len`` is skipped (``overlong: drop``) or cut to ``max_seq_len`` tokens
    (``overlong: truncate``). Counts ``pairs_read``, ``dropped_overlong`` and ``truncated`` in ``stats``.
    """
    with Path(path).open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            stats["pairs_read"] += 1
            try:
                row = json.loads(line)
                check_row(row)
                prompt = messages(row["prompt"], "user")
                sides = [
                    tokenize_prompt_completion(prompt, messages(row[key], "assistant"), tokenizer)
                    for key in ("chosen", "rejected")
                ]
            except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
                raise SampleError(f"{path}:{number}: not a usable preference row: {exc}") from None
            if max(len(s.input_ids) for s in sides) > max_seq_len:
                if overlong == "drop":
                    stats["dropped_overlong"] += 1
                    continue
                sides = [TokenizedSample(s.input_ids[:max_seq_len], s.labels[:max_seq_len]) for s in sides]
                stats["truncated"] += 1
            yield row, sides


class _Pair(Protocol):
    @property
    def length(self) -> int: ...


class PairObjective:
    """The pair-per-sample part of a preference objective: one sample and one loss unit per pair."""

    pairs: Sequence[_Pair]
    metric_names: tuple[str, ...]

    @property
    def lengths(self) -> list[int]:
        return [p.length for p in self.pairs]

    @property
    def loss_units(self) -> list[int]:
        return [1] * len(self.pairs)

    def empty_loss(
        self, model: nn.Module, micro_batch: MicroBatch, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A forward pass over a rank's placeholder micro-batch that keeps the collectives in step and
        contributes nothing: a zero loss in the graph and zero metrics."""
        out = model(
            input_ids=micro_batch.input_ids.to(device),
            position_ids=micro_batch.position_ids.to(device),
            use_cache=False,
        )
        return out.logits.sum() * 0.0, torch.zeros(len(self.metric_names), dtype=torch.float64, device=device)
