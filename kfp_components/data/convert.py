"""The row formats people already have, their detection, and their conversion to the formats the trainer reads.

Each *source format* converts to one of the written formats of :mod:`kfp_components.data.formats`:

==========================  ======================================================================  ==========
source format               a row                                                                   written as
==========================  ======================================================================  ==========
``messages``                ``{"messages": [{"role", "content"}, ...]}``                            messages
``conversations``           ``{"conversations": [{"role", "content"}, ...]}``                       messages
``sharegpt``                ``{"conversations": [{"from", "value"}, ...], "system"?, "tools"?}``    messages
``alpaca``                  ``{"instruction", "input"?, "output", "system"?}``                      messages
``prompt_completion``       ``{"prompt", "completion"}`` (strings or message lists)                 messages
``text``                    ``{"text"}``: plain text, every token trained                           text
``preference``              ``{"prompt", "chosen", "rejected"}``                                    preference
``implicit_preference``     ``{"chosen", "rejected"}`` sharing a prefix, the prompt                 preference
``prompt``                  ``{"prompt", "answer"?}``                                               prompt
==========================  ======================================================================  ==========

Detection reads only a row's keys (and, for ``conversations``, the keys of its first message), so it costs
next to nothing; :func:`convert_row` then returns the written row and the problems found, each naming the
key path in the row as it was given (``conversations[3].from: 'robot' is not a known speaker``). Extra
columns a conversion does not read are kept (``answer`` of a prompt row feeds the reward functions); the
columns it reads are replaced by the written ones.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from kfp_components.data.formats import (
    MESSAGES,
    PREFERENCE,
    PROMPT,
    TEXT,
    WEIGHT,
    check_order,
    check_row,
    check_weight,
    show,
    type_name,
)

CONVERSATIONS = "conversations"
SHAREGPT = "sharegpt"
ALPACA = "alpaca"
PROMPT_COMPLETION = "prompt_completion"
IMPLICIT_PREFERENCE = "implicit_preference"
#: Every source format and the format it is written as.
WRITTEN_AS: dict[str, str] = {
    MESSAGES: MESSAGES,
    CONVERSATIONS: MESSAGES,
    SHAREGPT: MESSAGES,
    ALPACA: MESSAGES,
    PROMPT_COMPLETION: MESSAGES,
    TEXT: TEXT,
    PREFERENCE: PREFERENCE,
    IMPLICIT_PREFERENCE: PREFERENCE,
    PROMPT: PROMPT,
}
SOURCE_FORMATS = tuple(WRITTEN_AS)
#: The columns a row may have (the targets ``dataset_field_map`` may name).
KNOWN_COLUMNS = (
    "messages",
    "conversations",
    "system",
    "tools",
    "instruction",
    "input",
    "output",
    "prompt",
    "completion",
    "chosen",
    "rejected",
    "answer",
    "text",
    WEIGHT,
)
#: ShareGPT speakers and the roles they become; ``function_call`` becomes an assistant turn calling a tool.
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "function_call": "assistant",
    "tool": "tool",
    "observation": "tool",
}


def detect_source_format(row: Any) -> str | None:
    """The source format a row's keys say it is in, or None when they match none."""
    if not isinstance(row, dict):
        return None
    if MESSAGES in row:
        return MESSAGES
    if CONVERSATIONS in row:
        turns = row[CONVERSATIONS]
        first = turns[0] if isinstance(turns, list) and turns else None
        if isinstance(first, dict) and "from" not in first and "role" in first:
            return CONVERSATIONS
        return SHAREGPT
    if "chosen" in row and "rejected" in row:
        return PREFERENCE if "prompt" in row else IMPLICIT_PREFERENCE
    if "prompt" in row:
        return PROMPT_COMPLETION if "completion" in row else PROMPT
    if "instruction" in row:
        return ALPACA
    if TEXT in row:
        return TEXT
    return None


def required_keys(source_format: str) -> tuple[str, ...]:
    return _REQUIRED[source_format]


_REQUIRED: dict[str, tuple[str, ...]] = {
    MESSAGES: (MESSAGES,),
    CONVERSATIONS: (CONVERSATIONS,),
    SHAREGPT: (CONVERSATIONS,),
    ALPACA: ("instruction", "output"),
    PROMPT_COMPLETION: ("prompt", "completion"),
    TEXT: (TEXT,),
    PREFERENCE: ("prompt", "chosen", "rejected"),
    IMPLICIT_PREFERENCE: ("chosen", "rejected"),
    PROMPT: ("prompt",),
}


def convert_row(row: Any, source_format: str) -> tuple[Any, list[str]]:
    """``row`` (in ``source_format``) as a row of the written format, and every problem of it (empty when
    valid; the written row is then checked by :func:`kfp_components.data.formats.check_row`)."""
    if not isinstance(row, dict):
        return row, [f"expected a JSON object, got {type_name(row)}"]
    missing = [key for key in _REQUIRED[source_format] if key not in row]
    if missing:
        return row, [f"missing key(s) {', '.join(map(repr, missing))} of the {source_format!r} format"]
    converter = _CONVERTERS.get(source_format)
    if converter is None:  # written as it is
        return row, check_row(row, source_format)
    converted, problems = converter(row)
    if problems:
        return row, problems
    if source_format == SHAREGPT:  # checked while converted
        return converted, _check_extras(converted)
    written = WRITTEN_AS[source_format]
    checked = check_row(converted, written)
    if checked and source_format != IMPLICIT_PREFERENCE:
        return row, [f"as {written} rows: {problem}" for problem in checked]
    return converted, checked


def _check_extras(row: dict[str, Any]) -> list[str]:
    """The checks of a messages row beyond its conversation: the loss weight."""
    return check_weight(row[WEIGHT]) if WEIGHT in row else []


def _rest(row: dict[str, Any], *read: str) -> dict[str, Any]:
    """The columns of ``row`` a conversion does not read, kept as they are."""
    return {key: value for key, value in row.items() if key not in read}


def _convert_conversations(row: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    turns = row[CONVERSATIONS]
    if not isinstance(turns, list):
        return row, [f"{CONVERSATIONS}: expected a list of messages, got {type_name(turns)}"]
    return {MESSAGES: turns, **_rest(row, CONVERSATIONS)}, []


def _convert_sharegpt(row: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    turns = row[CONVERSATIONS]
    if not isinstance(turns, list):
        return row, [f"{CONVERSATIONS}: expected a list of turns, got {type_name(turns)}"]
    problems: list[str] = []
    messages: list[dict[str, Any]] = []
    system = row.get("system")
    if system is not None and system != "":
        if not isinstance(system, str):
            problems.append(f"system: expected a string, got {type_name(system)}")
        else:
            messages.append({"role": "system", "content": system})
    for i, turn in enumerate(turns):
        try:
            speaker, value = turn["from"], turn["value"]
            role = SHAREGPT_ROLES[speaker]
        except (KeyError, TypeError):
            problems.append(_turn_problem(turn, f"{CONVERSATIONS}[{i}]"))
            continue
        if value.__class__ is not str or not value.strip():
            if speaker == "function_call" or value.__class__ is not str:
                problems.append(_turn_problem(turn, f"{CONVERSATIONS}[{i}]"))
                continue
            problems.append(f"{CONVERSATIONS}[{i}].value: empty text")
            continue
        if speaker == "function_call":
            call, problem = _tool_call(value, f"{CONVERSATIONS}[{i}].value")
            if problem:
                problems.append(problem)
                continue
            messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
        else:
            messages.append({"role": role, "content": value})
    if not problems:
        if not turns:
            problems.append(f"{CONVERSATIONS}: the conversation is empty")
        else:
            problems += [
                f"as messages rows: {p}"
                for p in check_order([m["role"] for m in messages], MESSAGES, True, True)
            ]
            if not problems and not any(m["role"] == "assistant" for m in messages):
                problems.append(
                    f"{CONVERSATIONS}: no assistant turn, so there is nothing to learn from this row"
                )
    converted = {MESSAGES: messages, **_rest(row, CONVERSATIONS, "system", "tools")}
    tools = row.get("tools")
    if tools is not None and tools != "":
        parsed, problem = _tools(tools)
        if problem:
            problems.append(problem)
        elif parsed:
            converted["tools"] = parsed
    return converted, problems


def _turn_problem(turn: Any, where: str) -> str:
    """What is wrong with a ShareGPT turn that is not ``{"from": <known speaker>, "value": <text>}``."""
    if not isinstance(turn, dict):
        return f"{where}: expected an object with 'from' and 'value', got {type_name(turn)}"
    speaker = turn.get("from")
    if not isinstance(speaker, str) or speaker not in SHAREGPT_ROLES:
        shown = "missing" if speaker is None else show(speaker)
        return f"{where}.from: {shown} is not a known speaker ({', '.join(SHAREGPT_ROLES)})"
    value = turn.get("value")
    if value is None:
        return f"{where}.value: missing"
    if not isinstance(value, str):
        return f"{where}.value: expected a string, got {type_name(value)}"
    return f'{where}.value: a function_call must be JSON text {{"name": ..., "arguments": ...}}'


def _tool_call(value: str, where: str) -> tuple[dict[str, Any], str]:
    """A ShareGPT ``function_call`` value (JSON text ``{"name": ..., "arguments": ...}``) as a tool call."""
    try:
        call = json.loads(value)
    except ValueError:
        return {}, f'{where}: a function_call must be JSON text {{"name": ..., "arguments": ...}}'
    if not isinstance(call, dict) or not isinstance(call.get("name"), str) or not call["name"]:
        return {}, f"{where}: a function_call needs a 'name' (a string)"
    arguments = call.get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return {}, f"{where}: the arguments of function_call {call['name']!r} are not JSON"
    if not isinstance(arguments, dict):
        return {}, f"{where}: the arguments of function_call {call['name']!r} must be an object"
    return {"type": "function", "function": {"name": call["name"], "arguments": arguments}}, ""


def _tools(tools: Any) -> tuple[list[Any], str]:
    """A row's ``tools`` (a list of function schemas, or that list as JSON text, as LLaMA-Factory writes)."""
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except ValueError:
            return [], "tools: expected a list of function schemas (or that list as JSON text)"
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        return [], "tools: expected a list of function schemas (objects)"
    return tools, ""


def _convert_alpaca(row: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    problems = []
    for key in ("instruction", "output"):
        value = row[key]
        if not isinstance(value, str):
            problems.append(f"{key}: expected a string, got {type_name(value)}")
        elif not value.strip():
            problems.append(f"{key}: empty text")
    for key in ("input", "system"):
        value = row.get(key)
        if value is not None and not isinstance(value, str):
            problems.append(f"{key}: expected a string, got {type_name(value)}")
    if problems:
        return row, problems
    extra = row.get("input") or ""
    user = f"{row['instruction']}\n\n{extra}" if extra.strip() else row["instruction"]
    messages = [{"role": "system", "content": row["system"]}] if row.get("system") else []
    messages += [{"role": "user", "content": user}, {"role": "assistant", "content": row["output"]}]
    return {MESSAGES: messages, **_rest(row, "instruction", "input", "output", "system")}, []


def _convert_prompt_completion(row: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    prompt, completion = row["prompt"], row["completion"]
    messages: list[Any] = []
    problems = []
    for key, value, role in (("prompt", prompt, "user"), ("completion", completion, "assistant")):
        if isinstance(value, list):
            messages += value
        elif isinstance(value, str):
            messages.append({"role": role, "content": value})
        else:
            problems.append(f"{key}: expected a string or a list of messages, got {type_name(value)}")
    return {MESSAGES: messages, **_rest(row, "prompt", "completion")}, problems


def _convert_implicit_preference(row: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Split two conversations that share a prefix into the prompt (the prefix) and the two answers."""
    chosen, rejected = row["chosen"], row["rejected"]
    rest = _rest(row, "chosen", "rejected")
    if isinstance(chosen, str) and isinstance(rejected, str):
        shared = _common_prefix(chosen, rejected)
        ends = [text[shared : shared + 1] for text in (chosen, rejected)]
        inside_a_word = (
            shared > 0 and not chosen[shared - 1].isspace() and any(end and not end.isspace() for end in ends)
        )
        if inside_a_word:  # the texts part inside a word: the whole word belongs to the answers
            while shared and not chosen[shared - 1].isspace():
                shared -= 1
        if shared and chosen[shared - 1] == " ":
            shared -= 1  # the space before an answer belongs to it (' Sure...')
        if not chosen[:shared].strip():
            return row, ["chosen and rejected share no prefix, so there is no prompt to take from them"]
        return {
            "prompt": chosen[:shared],
            "chosen": chosen[shared:],
            "rejected": rejected[shared:],
            **rest,
        }, []
    if isinstance(chosen, list) and isinstance(rejected, list):
        shared = 0
        while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
            shared += 1
        if not shared:
            return row, ["chosen and rejected share no prefix, so there is no prompt to take from them"]
        if shared == len(chosen) or shared == len(rejected):
            return row, ["chosen and rejected differ in no turn after their shared prefix"]
        return {
            "prompt": chosen[:shared],
            "chosen": chosen[shared:],
            "rejected": rejected[shared:],
            **rest,
        }, []
    return row, [
        f"chosen and rejected must both be strings or both lists of messages, got {type_name(chosen)} "
        f"and {type_name(rejected)}"
    ]


def _common_prefix(a: str, b: str) -> int:
    length = min(len(a), len(b))
    low, high = 0, length  # the longest prefix, by halving (fast on long texts)
    while low < high:
        middle = (low + high + 1) // 2
        if a[:middle] == b[:middle]:
            low = middle
        else:
            high = middle - 1
    return low


_CONVERTERS: dict[str, Callable[[dict[str, Any]], tuple[dict[str, Any], list[str]]]] = {
    CONVERSATIONS: _convert_conversations,
    SHAREGPT: _convert_sharegpt,
    ALPACA: _convert_alpaca,
    PROMPT_COMPLETION: _convert_prompt_completion,
    IMPLICIT_PREFERENCE: _convert_implicit_preference,
}


def rename_columns(row: Any, field_map: dict[str, str]) -> tuple[Any, str]:
    """``row`` with its columns renamed by ``field_map`` (the file's name -> ours), or why it cannot be."""
    if not field_map or not isinstance(row, dict):
        return row, ""
    renamed = {field_map.get(key, key): value for key, value in row.items()}
    if len(renamed) < len(row):
        for key, target in field_map.items():
            if key in row and target in row:
                return row, (
                    f"dataset_field_map maps {key!r} to {target!r}, but the row has a {target!r} column too"
                )
        return row, "dataset_field_map maps two of the row's columns to the same name"
    return renamed, ""
