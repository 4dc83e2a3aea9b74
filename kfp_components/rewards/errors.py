"""The one error type of reward functions: what failed, on which sample, with which prompt."""

from __future__ import annotations

from typing import Any

#: How much of a prompt an error message quotes.
PROMPT_EXCERPT_CHARS = 80


class RewardError(ValueError):
    """A reward function could not be loaded, or failed, or answered something that is not a score.

    ``reference`` is the function as the config names it (``my_rewards.py:accuracy``, ``format_regex``);
    ``index`` is the sample's position in the scored batch (``None`` when the problem is not one sample's);
    ``prompt`` is that sample's prompt, cut to :data:`PROMPT_EXCERPT_CHARS` characters.
    """

    def __init__(self, reference: str, message: str, *, index: int | None = None, prompt: Any = None):
        self.reference = reference
        self.index = index
        self.prompt = None if prompt is None else prompt_excerpt(prompt)
        self.detail = message
        where = ""
        if index is not None:
            where = f" (sample {index}" + (f", prompt {self.prompt!r})" if self.prompt is not None else ")")
        super().__init__(f"reward function {reference}{where}: {message}")

    def at(self, reference: str, index: int | None, prompt: Any) -> RewardError:
        """This error for ``reference``, with the sample filled in where it had none."""
        if self.index is not None:
            return RewardError(reference, self.detail, index=self.index, prompt=self.prompt)
        return RewardError(reference, self.detail, index=index, prompt=prompt)


def prompt_excerpt(prompt: Any) -> str:
    """A prompt (text or chat messages) as one line of at most :data:`PROMPT_EXCERPT_CHARS` characters."""
    if isinstance(prompt, list):
        text = " | ".join(
            f"{m.get('role', '?')}: {m.get('content', '')}" if isinstance(m, dict) else str(m) for m in prompt
        )
    else:
        text = str(prompt)
    text = " ".join(text.split())
    return text if len(text) <= PROMPT_EXCERPT_CHARS else text[: PROMPT_EXCERPT_CHARS - 3] + "..."
