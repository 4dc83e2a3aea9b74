"""Prompts for the online algorithms: read ``prompt`` rows, render them for generation, plan their order.

A row is the dataset stage's ``prompt`` format: ``{"prompt": "..." | [messages], "answer": ..., ...}``. The
prompt (a string becomes one user message) is rendered with the model's chat template and the generation
prompt (``<|im_start|>assistant\\n``), then tokenized with ``add_special_tokens=False``: the model sees what it
would see at inference. Every other column of the row reaches the reward functions by name.

A prompt longer than ``max_seq_len - max_new_tokens`` tokens leaves no room for its completion: ``overlong:
drop`` skips it (and counts it); ``truncate`` keeps its last tokens (the end of a prompt, where the question
usually is, and the generation prompt).

:class:`PromptOrder` decides which prompts each step generates for: a seeded shuffle per epoch, cut into
steps of ``prompts_per_step``, each step's prompts split evenly over the ranks. Like the token-budget sampler
it is a pure function of the seed and the position, so a resumed run continues with the very prompts it
would have seen.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kfp_components.data.formats import PROMPT, check_row
from kfp_components.trainer.tokenize import ChatTemplateError, SampleError


@dataclass(frozen=True)
class PromptRow:
    """One prompt: its text or messages as written, the tokens the model generates after, the other
    columns of its row (``answer``, ...), and ``file:line`` for messages."""

    prompt: str | list[dict[str, Any]]
    prompt_ids: list[int]
    columns: dict[str, Any]
    where: str


@dataclass
class PromptSet:
    """The usable prompts of a file, in file order, and what happened to the rest."""

    rows: list[PromptRow]
    stats: dict[str, float] = field(default_factory=dict)

    @property
    def column_names(self) -> list[str]:
        """The columns every row has (the ones a reward function can rely on), sorted."""
        if not self.rows:
            return []
        common = set(self.rows[0].columns)
        for row in self.rows[1:]:
            common &= row.columns.keys()
        return sorted(common)


def load_prompts(
    path: str | Path, tokenizer: Any, *, max_prompt_tokens: int, overlong: str = "drop"
) -> PromptSet:
    """Read and tokenize every ``prompt`` row of a JSONL file.

    Raises:
        SampleError: A row is not JSON or not a valid ``prompt`` row (a ``messages`` row, say); names
            ``file:line`` and the problem.
        ChatTemplateError: The tokenizer has no chat template to render the prompts with.
    """
    if getattr(tokenizer, "chat_template", None) is None:
        raise ChatTemplateError(
            f"{path}: the tokenizer has no chat template; the online algorithms render every prompt with it "
            "(add one to the tokenizer, or start from a chat model)"
        )
    rows: list[PromptRow] = []
    stats: dict[str, float] = dict.fromkeys(
        ("prompts_read", "prompts_kept", "dropped_overlong", "truncated"), 0
    )
    pending: list[tuple[str, dict[str, Any]]] = []
    with Path(path).open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            stats["prompts_read"] += 1
            where = f"{path}:{number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise SampleError(f"{where}: not valid JSON ({exc.msg})") from None
            problems = check_row(row, PROMPT)
            if problems:
                raise SampleError(f"{where}: not a usable prompt row: {'; '.join(problems)}")
            pending.append((where, row))
    texts = _render([_messages(row["prompt"]) for _, row in pending], tokenizer, str(path))
    for (where, row), text in zip(pending, texts, strict=True):
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        if len(ids) > max_prompt_tokens:
            if overlong == "drop":
                stats["dropped_overlong"] += 1
                continue
            ids = ids[-max_prompt_tokens:]
            stats["truncated"] += 1
        columns = {key: value for key, value in row.items() if key != "prompt"}
        rows.append(PromptRow(prompt=row["prompt"], prompt_ids=ids, columns=columns, where=where))
    stats["prompts_kept"] = len(rows)
    stats["prompt_tokens"] = sum(len(row.prompt_ids) for row in rows)
    return PromptSet(rows, stats)


def _messages(prompt: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def _render(conversations: list[list[dict[str, Any]]], tokenizer: Any, where: str) -> list[str]:
    if not conversations:
        return []
    try:
        rendered = tokenizer.apply_chat_template(conversations, tokenize=False, add_generation_prompt=True)
    except Exception as error:  # jinja2 errors, the template's raise_exception
        raise ChatTemplateError(f"{where}: the chat template failed to render a prompt: {error}") from error
    return list(rendered)


@dataclass(frozen=True)
class PromptOrder:
    """Which prompts each step of each epoch generates for, on each rank.

    Args:
        num_prompts: Prompts in the set.
        prompts_per_step: Prompts of one step over all ranks (``effective_batch_size / num_generations``).
        world_size: Ranks; each generates for ``prompts_per_step / world_size`` of them.
        seed: Seed of the per-epoch shuffle.
    """

    num_prompts: int
    prompts_per_step: int
    world_size: int
    seed: int

    def __post_init__(self) -> None:
        if self.prompts_per_step % self.world_size:
            raise ValueError(
                f"{self.prompts_per_step} prompts per step do not split evenly over {self.world_size} "
                "processes; make effective_batch_size / num_generations a multiple of the process count"
            )
        if self.num_prompts < self.prompts_per_step:
            raise ValueError(
                f"{self.num_prompts} prompts are fewer than one step needs ({self.prompts_per_step}: "
                "effective_batch_size / num_generations); add prompts or lower effective_batch_size"
            )

    def steps_per_epoch(self) -> int:
        """Whole steps in one pass over the prompts (the remainder waits for the next epoch's shuffle)."""
        return self.num_prompts // self.prompts_per_step

    def epoch_plan(self, epoch: int) -> list[list[int]]:
        """The prompt indices of every step of ``epoch`` (all ranks; rank r's part is :meth:`for_rank`)."""
        order = list(range(self.num_prompts))
        random.Random(f"{self.seed}:{epoch}").shuffle(order)
        size = self.prompts_per_step
        return [order[step * size : (step + 1) * size] for step in range(self.steps_per_epoch())]

    def for_rank(self, step_prompts: Sequence[int], rank: int) -> list[int]:
        """Rank ``rank``'s contiguous share of one step's prompts."""
        share = self.prompts_per_step // self.world_size
        return list(step_prompts[rank * share : (rank + 1) * share])
