"""The judge's prompts: default templates, their placeholders, and rendering a template for one sample.

A template is a Python format string. The pointwise template (``prompt_template``) must contain
``{response}``; the pairwise template (``pairwise_template``) ``{response_a}`` and ``{response_b}``. Both may use
``{prompt}`` (the conversation's text), ``{score_min}`` and ``{score_max}`` (the pointwise scale), and any
column of the prompt rows (``{answer}``, ``{reference}``). Literal braces are written ``{{`` and ``}}``. A
placeholder that is not one of these is reported when the template is rendered on the first row (a dry run
and the start of a stage do that), naming the placeholder and the columns the rows have.
"""

from __future__ import annotations

import string
from collections.abc import Mapping
from typing import Any

from kfp_components.typed_config import ConfigError

DEFAULT_POINTWISE_TEMPLATE = (
    "Rate how well the response answers the user's request: correct, helpful and clear. Give a score "
    "from {score_min} (worst) to {score_max} (best). Reply with the score only.\n\n"
    "[Request]\n{prompt}\n\n[Response]\n{response}\n\nScore:"
)
DEFAULT_PAIRWISE_TEMPLATE = (
    "Two responses answer the same request. Which one is better: correct, helpful and clear? "
    "Reply with A or B only.\n\n"
    "[Request]\n{prompt}\n\n[Response A]\n{response_a}\n\n[Response B]\n{response_b}\n\nBetter response:"
)

#: Placeholders the judge fills itself; the rest come from the rows' columns.
POINTWISE_FIELDS = ("prompt", "response", "score_min", "score_max")
PAIRWISE_FIELDS = ("prompt", "response_a", "response_b")


def placeholders(template: str, key: str) -> list[str]:
    """The field names of ``template`` in order; a :class:`ConfigError` at ``key`` when it does not parse or
    uses attribute or index access (``{prompt.x}``, ``{prompt[0]}``) or positional fields (``{}``)."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ConfigError(
            key, f"is not a valid template ({exc}); write literal braces as {{{{ and }}}}"
        ) from None
    names = []
    for _, name, _, _ in parsed:
        if name is None:
            continue
        if not name.isidentifier():
            raise ConfigError(
                key, f"placeholder {{{name}}}: use plain names such as {{prompt}} (literal braces: {{{{ }}}})"
            )
        names.append(name)
    return names


def check_template(template: str, key: str, required: tuple[str, ...]) -> None:
    """``template`` parses and contains every ``required`` placeholder; a :class:`ConfigError` at ``key``."""
    if not template.strip():
        raise ConfigError(key, "is empty")
    names = placeholders(template, key)
    missing = [name for name in required if name not in names]
    if missing:
        raise ConfigError(
            key,
            f"must contain {', '.join('{' + name + '}' for name in missing)} (where the judge puts "
            f"{'the response' if missing == ['response'] else 'the responses'}); it has "
            f"{', '.join('{' + name + '}' for name in names) or 'no placeholder'}",
        )


def render(template: str, key: str, values: Mapping[str, Any], columns: Mapping[str, Any]) -> str:
    """``template`` with the judge's ``values`` and the row's ``columns`` (the judge's names win); an unknown
    placeholder is a :class:`ConfigError` at ``key`` listing what is available."""
    available = {**{name: _text(value) for name, value in columns.items()}, **values}
    unknown = [name for name in placeholders(template, key) if name not in available]
    if unknown:
        raise ConfigError(
            key,
            f"placeholder {{{unknown[0]}}} is neither the judge's ({', '.join(values)}) nor a column of the "
            f"prompt rows ({', '.join(sorted(columns)) or 'none'})",
        )
    return template.format_map(available)


def conversation_text(prompt: Any) -> str:
    """A prompt as the judge reads it: a string as is; messages as ``Role: content`` lines (a single user
    message as its content alone)."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list):
        messages = [m for m in prompt if isinstance(m, Mapping)]
        if len(messages) == 1 and messages[0].get("role") == "user":
            return _text(messages[0].get("content", ""))
        return "\n".join(
            f"{str(m.get('role', '')).capitalize()}: {_text(m.get('content', ''))}" for m in messages
        )
    return _text(prompt)


def _text(value: Any) -> str:
    return value if isinstance(value, str) else str(value)
