"""The four written row formats, their detection, and the per-row checks.

* ``messages``: ``{"messages": [{"role": ..., "content": ...}, ...]}`` for SFT and OSFT; an optional numeric
  ``weight`` (finite, > 0; 1 when absent) scales the row's loss.
* ``preference``: ``{"prompt": ..., "chosen": ..., "rejected": ...}`` for DPO; each value a string or a
  list of messages.
* ``prompt``: ``{"prompt": ..., "answer": ...?}`` for RL and distillation; the prompt a string or a list of
  messages, the answer an optional string.
* ``text``: ``{"text": ...}`` plain text for continued pre-training: the loss is taken on every token.

The formats people bring (ShareGPT, Alpaca, prompt/completion, ...) are converted to these by
:mod:`kfp_components.data.convert`.

Every check returns a list of human-readable problems (empty when the row is valid) whose text names the
key path inside the row, for example ``messages[2].role: 'robot' is not one of system, user, ...``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

MESSAGES = "messages"
#: The optional per-row loss weight of a ``messages`` row.
WEIGHT = "weight"
PREFERENCE = "preference"
PROMPT = "prompt"
TEXT = "text"
FORMATS = (MESSAGES, PREFERENCE, PROMPT, TEXT)
ROLES = ("system", "user", "assistant", "tool")
REQUIRED_KEYS = {
    MESSAGES: ("messages",),
    PREFERENCE: ("prompt", "chosen", "rejected"),
    PROMPT: ("prompt",),
    TEXT: (TEXT,),
}

_MAX_VALUE_SHOWN = 40


def detect_row_format(row: Any) -> str | None:
    """The format a row's keys say it is in, or None when they match none."""
    if not isinstance(row, dict):
        return None
    if MESSAGES in row:
        return MESSAGES
    if {"prompt", "chosen", "rejected"} <= row.keys():
        return PREFERENCE
    if "prompt" in row:
        return PROMPT
    if TEXT in row:
        return TEXT
    return None


def check_row(row: Any, data_format: str) -> list[str]:
    """Every problem that makes ``row`` unusable as ``data_format``."""
    if not isinstance(row, dict):
        return [f"expected a JSON object, got {type_name(row)}"]
    missing = [key for key in REQUIRED_KEYS[data_format] if key not in row]
    if missing:
        return [f"missing key(s) {', '.join(map(repr, missing))} of the {data_format!r} format"]
    return _CHECKS[data_format](row)


def _check_messages_row(row: dict[str, Any]) -> list[str]:
    problems = _check_message_list(row.get(MESSAGES), MESSAGES)
    if not problems and not any(m["role"] == "assistant" for m in row[MESSAGES]):
        problems.append("messages: no assistant turn, so there is nothing to learn from this row")
    if WEIGHT in row:
        problems += check_weight(row[WEIGHT])
    return problems


def check_weight(value: Any) -> list[str]:
    """A row's loss weight: a finite number above 0."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return [f"{WEIGHT}: expected a number above 0, got {type_name(value)}"]
    if not math.isfinite(value) or value <= 0:
        return [f"{WEIGHT}: expected a finite number above 0, got {show(value)}"]
    return []


def _check_preference_row(row: dict[str, Any]) -> list[str]:
    problems: list[str] = []
    prompt = row["prompt"]
    if isinstance(prompt, list):
        problems += _check_message_list(prompt, "prompt", allow_assistant_last=False)
    else:
        problems += _check_text(prompt, "prompt")
    for key in ("chosen", "rejected"):
        value = row[key]
        if isinstance(value, list):
            problems += _check_message_list(value, key, must_start_with_user=False)
            if not problems and not any(m["role"] == "assistant" for m in value):
                problems.append(f"{key}: no assistant turn")
        else:
            problems += _check_text(value, key)
    if not problems and row["chosen"] == row["rejected"]:
        problems.append("chosen and rejected are identical, so the pair carries no preference")
    return problems


def _check_prompt_row(row: dict[str, Any]) -> list[str]:
    prompt = row["prompt"]
    if isinstance(prompt, list):
        problems = _check_message_list(prompt, "prompt", allow_assistant_last=False)
    else:
        problems = _check_text(prompt, "prompt")
    if "answer" in row and row["answer"] is not None:
        problems += _check_text(row["answer"], "answer")
    return problems


def _check_text_row(row: dict[str, Any]) -> list[str]:
    problems = _check_text(row[TEXT], TEXT)
    if WEIGHT in row:
        problems += check_weight(row[WEIGHT])
    return problems


_CHECKS: dict[str, Callable[[dict[str, Any]], list[str]]] = {
    MESSAGES: _check_messages_row,
    PREFERENCE: _check_preference_row,
    PROMPT: _check_prompt_row,
    TEXT: _check_text_row,
}


def _check_text(value: Any, path: str) -> list[str]:
    if not isinstance(value, str):
        return [f"{path}: expected a string, got {type_name(value)}"]
    if not value.strip():
        return [f"{path}: empty text"]
    return []


def _check_message_list(
    messages: Any,
    path: str,
    *,
    must_start_with_user: bool = True,
    allow_assistant_last: bool = True,
) -> list[str]:
    """Check a conversation: roles, content and a sane order of turns."""
    if not isinstance(messages, list):
        return [f"{path}: expected a list of messages, got {type_name(messages)}"]
    if not messages:
        return [f"{path}: the conversation is empty"]
    problems: list[str] = []
    for i, message in enumerate(messages):
        where = f"{path}[{i}]"
        if not isinstance(message, dict):
            problems.append(
                f"{where}: expected an object with 'role' and 'content', got {type_name(message)}"
            )
            continue
        role = message.get("role")
        if role not in ROLES:
            shown = "missing" if role is None else show(role)
            problems.append(f"{where}.role: {shown} is not one of {', '.join(ROLES)}")
        content = message.get("content")
        if role == "assistant" and message.get("tool_calls") and (content is None or content == ""):
            continue  # an assistant turn that only calls tools
        if content is None:
            problems.append(f"{where}.content: missing")
        elif not isinstance(content, str):
            problems.append(f"{where}.content: expected a string, got {type_name(content)}")
        elif not content.strip():
            problems.append(f"{where}.content: empty text")
    if problems:
        return problems
    return check_order([m["role"] for m in messages], path, must_start_with_user, allow_assistant_last)


def check_order(
    roles: list[str], path: str, must_start_with_user: bool, allow_assistant_last: bool
) -> list[str]:
    for i, role in enumerate(roles):
        previous = roles[i - 1] if i else None
        if role == "system" and i != 0:
            return [f"{path}[{i}].role: a system message may only come first"]
        if role == "tool" and previous not in ("assistant", "tool"):
            return [f"{path}[{i}].role: a tool message must follow an assistant or tool message"]
        if role in ("user", "assistant") and role == previous:
            return [f"{path}[{i}].role: two {role} turns in a row"]
    first = 1 if roles[0] == "system" else 0
    if first >= len(roles):
        return [f"{path}: only a system message"]
    if must_start_with_user and roles[first] != "user":
        return [f"{path}[{first}].role: the conversation must start with a user turn, not {roles[first]!r}"]
    if not allow_assistant_last and roles[-1] == "assistant":
        return [f"{path}[{len(roles) - 1}].role: a prompt must not end with an assistant turn"]
    return []


def type_name(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}
    if type(value) in names:
        return names[type(value)]
    if isinstance(value, int | float):
        return f"a number ({show(value)})"
    return type(value).__name__


def show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= _MAX_VALUE_SHOWN else text[: _MAX_VALUE_SHOWN - 3] + "..."
