"""Turn chat conversations into token ids and loss labels for the training engine.

Every sample is rendered with the model's own chat template
(``tokenizer.apply_chat_template(messages, tokenize=False)``) and the whole text is tokenized once with
``add_special_tokens=False``: the template already writes the BOS token where the model wants one, so the
tokens are exactly those the model sees at inference (Hugging Face and vLLM tokenize rendered chats the
same way). A rendering that starts with two BOS tokens is refused. Labels are ``-100`` (no loss) everywhere except the assistant turns: the assistant's content
and its end-of-turn token (``<|im_end|>``, ``<|eot_id|>``), never the assistant header, the role tokens,
or the newline a template writes after the end-of-turn token. ``unmask=True`` trains on every token.
Labels are *not* shifted: ``labels[i]`` is the label of ``input_ids[i]``; the training loop shifts.

Finding the assistant turns: prefix rendering
---------------------------------------------
Most chat templates found in the wild have no ``{% generation %}`` markers, so the template cannot tell
us which characters it rendered for the assistant. We find out by rendering *prefixes* of the
conversation. For the assistant message ``i``:

* ``render(messages[:i], add_generation_prompt=True)`` is the text up to where the model starts writing
  its answer (it ends with the assistant header, ``<|im_start|>assistant\\n``), so its length is where the
  answer *starts* in the full rendering;
* ``render(messages[:i + 1])`` is the text up to the end of the answer's turn; with trailing whitespace
  removed (the ``\\n`` after ``<|im_end|>``), its length is where the answer *ends*, just after the
  end-of-turn token.

This is exactly the split the model meets at inference: the prompt is rendered with
``add_generation_prompt=True`` and the model generates the rest, end-of-turn token included. The
prefixes of one conversation are rendered in two batched ``apply_chat_template`` calls (all answer
starts, then all turn ends, the last of which is the whole conversation). The method only
works when both renderings are string prefixes of the rendering of the whole conversation, and that is
checked for every turn. Templates that render a turn differently depending on what follows it defeat the
method (Qwen3 and DeepSeek-R1 strip the reasoning of earlier assistant turns, some templates treat the
last message specially, some generation prompts open a ``<think>`` block the stored turns lack): such
templates raise :class:`ChatTemplateError` naming the turn and the first character where the renderings
differ, because training on them would teach the model a text it never sees at inference. A template
that drops or rewrites assistant content is caught by checking that every assistant message's content
(stripped, since templates such as Llama 3's trim it) and every tool call's name appear in its span.

Character spans become token spans through the tokenizer's offsets (a fast tokenizer is required): a
token is labelled when its characters overlap an assistant span. A token that straddles the start of a
span (the template's ``\\n`` merged with a content that starts with a newline) is therefore labelled, so
that no character of the answer goes unlearned.

Templates that do have ``{% generation %}`` markers are read through
``apply_chat_template(..., return_assistant_tokens_mask=True)`` instead: their authors decide what is
trained, so a template that rewrites earlier turns (a Qwen3-style one) works when it is marked up. The
round-trip checks apply to both paths.

Round-trip checks
-----------------
The token ids of the full text must decode back to the rendered text, and the labelled tokens of every
assistant turn must decode to the text they cover (up to whitespace at its ends: decoded on its own, a
slice loses the leading space a SentencePiece decoder strips). A tokenizer that normalises text (lower-casing,
stripping accents, replacing characters) fails these checks with :class:`ChatTemplateError`, since the
model would be trained on text other than the data. Unicode NFC composition (the Qwen2 tokenizers apply
it) is accepted: it only changes how a character is encoded, not which character it is.

Reading a data file
-------------------
:func:`tokenize_jsonl` reads the dataset stage's ``{"messages": [...]}`` JSONL (or, with
``data_format="text"``, its ``{"text": ...}`` rows: plain text tokenized as it is, the tokenizer's
special tokens added and an end-of-text token appended, every token labelled) (an optional ``"tools"``
list is passed to the template; an optional ``"weight"`` becomes the sample's loss weight), validates each row with the dataset stage's checks, tokenizes it, and
applies the ``max_seq_len`` policy. Every error names ``file:line``. With ``num_workers > 1`` the rows are
tokenized in a pool of processes (forked on Linux), in chunks whose results are gathered in file order,
so the output is identical to the single-process output.
"""

from __future__ import annotations

import gc
import json
import multiprocessing
import os
import re
import sys
import unicodedata
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from itertools import islice
from typing import TYPE_CHECKING, Any, Literal, cast

from kfp_components.data.formats import MESSAGES, TEXT, WEIGHT, check_row

if TYPE_CHECKING:
    from tokenizers import Encoding, Tokenizer
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "IGNORE_INDEX",
    "ChatTemplateError",
    "SampleError",
    "TokenizedDataset",
    "TokenizedSample",
    "tokenize_jsonl",
    "tokenize_messages",
    "tokenize_prompt_completion",
    "tokenize_text",
]

#: Label of a token that carries no loss (the ``ignore_index`` of PyTorch's cross-entropy).
IGNORE_INDEX = -100

Overlong = Literal["drop", "truncate"]

# ``{% generation %}`` / ``{%- generation -%}``: the markers transformers uses for assistant masks.
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")
# How many characters of context an error message shows on each side of a difference.
_CONTEXT_CHARS = 40
# Rows per chunk handed to a worker process: large enough to amortise the transfer, small enough to balance.
_CHUNK_ROWS = 256
# Chunks submitted to the pool ahead of the one being collected, per worker (bounds the memory in flight).
_CHUNKS_IN_FLIGHT_PER_WORKER = 4


class ChatTemplateError(ValueError):
    """The chat template or the tokenizer cannot produce trustworthy labels for a sample.

    Raised when the template fails to render, when prefixes of a conversation do not render as prefixes of
    the whole conversation, when an assistant turn's content is missing from its rendering, when the
    tokens do not decode back to the rendered text, or when the rendering starts with two BOS tokens. The
    message names the problem and the sample (``file:line`` when known).
    """


class SampleError(ValueError):
    """A row of a data file is not a usable conversation (bad JSON, bad messages); names ``file:line``."""


@dataclass(frozen=True, slots=True)
class TokenizedSample:
    """One tokenized conversation.

    Attributes:
        input_ids: Token ids of the rendered conversation.
        labels: Same length as ``input_ids``; ``labels[i]`` is the target of ``input_ids[i]`` (not shifted)
            or :data:`IGNORE_INDEX` where no loss is taken.
        weight: The row's loss weight (its ``weight`` column; 1 when absent): every token loss of the
            sample is multiplied by it.
    """

    input_ids: list[int]
    labels: list[int]
    weight: float = 1.0

    def __post_init__(self) -> None:
        if len(self.input_ids) != len(self.labels):
            raise ValueError(f"{len(self.input_ids)} input ids but {len(self.labels)} labels")

    @property
    def num_label_tokens(self) -> int:
        """Tokens that carry a loss."""
        return len(self.labels) - self.labels.count(IGNORE_INDEX)


@dataclass
class TokenizedDataset:
    """The samples of a data file that survived the length policy, in file order, and what happened.

    ``stats`` holds ``samples_read`` (non-blank rows), ``samples_kept``, ``dropped_overlong`` (longer than
    ``max_seq_len`` with ``overlong="drop"``), ``truncated`` (kept samples cut to ``max_seq_len``),
    ``dropped_no_labels`` (no label left to learn from, usually after truncation), ``tokens`` and
    ``label_tokens`` (totals over the kept samples), ``max_len`` and ``mean_len`` (of the kept samples).
    """

    samples: list[TokenizedSample]
    stats: dict[str, float]

    @property
    def lengths(self) -> list[int]:
        """Tokens of each sample."""
        return [len(sample.input_ids) for sample in self.samples]


# --------------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------------


def tokenize_messages(
    messages: list[dict],
    tokenizer: PreTrainedTokenizerBase,
    *,
    unmask: bool = False,
    tools: list[dict] | None = None,
) -> TokenizedSample:
    """Tokenize one conversation with the tokenizer's chat template; labels on the assistant turns.

    Args:
        messages: ``[{"role": ..., "content": ...}, ...]``; assistant messages may carry ``tool_calls``.
        tokenizer: A fast (Rust-backed) Hugging Face tokenizer with a chat template.
        unmask: Label every token, not only the assistant turns (the template is then only checked for
            round-tripping).
        tools: Function schemas passed to the template as ``tools``.

    Raises:
        ChatTemplateError: The template or tokenizer defeats the labelling (see the module docstring).
    """
    return _tokenize(messages, tokenizer, tools=tools, unmask=unmask, first_labelled=0, where=None)


def tokenize_text(text: str, tokenizer: PreTrainedTokenizerBase) -> TokenizedSample:
    """Tokenize plain text for continued pre-training: the tokenizer's special tokens (a BOS where the model
    wants one), the text, and the end-of-text token unless the text already ends with it; every token is
    labelled."""
    input_ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
    eos = tokenizer.eos_token_id
    if eos is not None and (not input_ids or input_ids[-1] != eos):
        input_ids.append(eos)
    return TokenizedSample(input_ids, list(input_ids))


def tokenize_prompt_completion(
    prompt_messages: list[dict],
    completion_messages: list[dict],
    tokenizer: PreTrainedTokenizerBase,
    *,
    tools: list[dict] | None = None,
) -> TokenizedSample:
    """Tokenize a prompt and its completion (for preference training); labels only on the completion.

    The conversation ``prompt_messages + completion_messages`` is rendered and tokenized once. The prompt,
    rendered with ``add_generation_prompt=True``, must be a prefix of that rendering, and only the
    completion's assistant turns (content and end-of-turn token) are labelled; tool results inside the
    completion are not.

    Raises:
        ValueError: The completion does not start with an assistant message.
        ChatTemplateError: The template or tokenizer defeats the labelling.
    """
    if not completion_messages or completion_messages[0].get("role") != "assistant":
        raise ValueError("completion_messages must start with an assistant message")
    if not prompt_messages:
        raise ValueError("prompt_messages is empty")
    return _tokenize(
        [*prompt_messages, *completion_messages],
        tokenizer,
        tools=tools,
        unmask=False,
        first_labelled=len(prompt_messages),
        where=None,
    )


def tokenize_jsonl(
    path: str | os.PathLike[str],
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_seq_len: int,
    overlong: Overlong = "drop",
    unmask: bool = False,
    num_workers: int = 1,
    data_format: Literal["messages", "text"] = "messages",
) -> TokenizedDataset:
    """Tokenize every ``{"messages": [...]}`` (or ``{"text": ...}``) row of a JSONL file.

    Args:
        path: The dataset stage's JSONL output. Blank lines are skipped; a row may carry ``"tools"``.
        tokenizer: A fast Hugging Face tokenizer with a chat template.
        max_seq_len: Longest sample in tokens.
        overlong: ``drop`` longer samples, or ``truncate`` them to ``max_seq_len`` tokens. A sample left
            without a label that can be learned (none after its first token) is dropped either way.
        unmask: Label every token, not only the assistant turns.
        num_workers: Processes that tokenize in parallel (1: in this process). The output does not depend
            on it.
        data_format: messages (chat rows) or text (plain text rows, the loss on every token).

    Raises:
        SampleError: A row is not valid JSON or not a valid conversation (the message names file:line).
        ChatTemplateError: The template or tokenizer defeats the labelling of a row (names file:line).
    """
    if max_seq_len < 1:
        raise ValueError(f"max_seq_len must be positive, got {max_seq_len}")
    if overlong not in ("drop", "truncate"):
        raise ValueError(f"overlong must be 'drop' or 'truncate', got {overlong!r}")
    if num_workers < 1:
        raise ValueError(f"num_workers must be at least 1, got {num_workers}")
    if data_format not in (MESSAGES, TEXT):
        raise ValueError(f"data_format must be 'messages' or 'text', got {data_format!r}")
    _backend(tokenizer)  # fail before starting any worker

    job = _RowJob(tokenizer, str(path), max_seq_len, overlong, unmask, data_format)
    collector = _Collector()
    with open(path, "rb") as lines:
        chunks = _chunks(_numbered_rows(lines), _CHUNK_ROWS)
        results = map(job, chunks) if num_workers == 1 else _map_in_workers(job, chunks, num_workers)
        for outcomes in results:
            collector.add(outcomes)
    return collector.dataset()


# --------------------------------------------------------------------------------------------------------
# One conversation
# --------------------------------------------------------------------------------------------------------


def _tokenize(
    messages: Sequence[Mapping[str, Any]],
    tokenizer: PreTrainedTokenizerBase,
    *,
    tools: list[dict] | None,
    unmask: bool,
    first_labelled: int,
    where: str | None,
) -> TokenizedSample:
    """Render, tokenize, check and label ``messages``; only assistant turns from ``first_labelled`` on."""
    where = where or _describe(messages)
    backend = _backend(tokenizer)
    template = _chat_template(tokenizer, tools, where)
    turns = [i for i, m in enumerate(messages) if i >= first_labelled and m.get("role") == "assistant"]
    prefix_method = not unmask and not _has_generation_markers(template)
    spans: list[tuple[int, int]] = []
    if prefix_method and turns:
        text, spans = _prefix_spans(tokenizer, messages, tools, turns, where)
    else:
        text = _render(tokenizer, [messages], tools=tools, generation_prompt=False, where=where)[0]

    encoding = backend.encode(text, add_special_tokens=False)
    input_ids: list[int] = encoding.ids
    _check_round_trip(backend, input_ids, text, where)
    _check_single_bos(tokenizer, input_ids, where)
    if unmask:
        return TokenizedSample(input_ids, list(input_ids))
    if not prefix_method:
        spans = _marked_spans(tokenizer, messages, tools, encoding, text, first_labelled, where)

    labels = [IGNORE_INDEX] * len(input_ids)
    for start, end in spans:
        token_range = _token_range(encoding, start, end)
        if token_range is None:
            continue
        first, last = token_range
        labels[first : last + 1] = input_ids[first : last + 1]
        covered = text[_chars(encoding, first)[0] : _chars(encoding, last)[1]]
        decoded = backend.decode(input_ids[first : last + 1], skip_special_tokens=False)
        # Decoded alone, a slice may lose a leading space (SentencePiece decoders strip it): compare the rest.
        if not _same_text(decoded.strip(), covered.strip()):
            raise ChatTemplateError(
                f"{where}: the labelled tokens of an assistant turn decode to {_clip(decoded)!r}, not to the "
                f"text they were tokenized from, {_clip(covered)!r}; the tokenizer does not round-trip it"
            )
    return TokenizedSample(input_ids, labels)


def _prefix_spans(
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[Mapping[str, Any]],
    tools: list[dict] | None,
    turns: list[int],
    where: str,
) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans ``[start, end)`` of the assistant ``turns``.

    Two batched renders per conversation: every answer start (the prefix before the turn, with the
    generation prompt), then every turn end (the prefix through the turn) and the whole conversation,
    which is the last turn end when the conversation ends with an assistant turn, as it usually does.
    """
    if turns[0] == 0:
        raise ChatTemplateError(
            f"{where}: messages[0] is an assistant turn; with no turn before it there is no generation "
            "prompt to tell where its answer starts"
        )
    starts = _render(
        tokenizer, [messages[:i] for i in turns], tools=tools, generation_prompt=True, where=where
    )
    through = [messages[: i + 1] for i in turns]
    if turns[-1] != len(messages) - 1:
        through.append(messages)
    ends = _render(tokenizer, through, tools=tools, generation_prompt=False, where=where)
    text = ends[-1]
    spans = []
    for i, before, upto in zip(turns, starts, ends, strict=False):
        _check_prefix(before, text, f"messages[:{i}] with add_generation_prompt=True", i, where)
        _check_prefix(upto, text, f"messages[:{i + 1}]", i, where)
        start, end = len(before), len(upto.rstrip())
        if end <= start:
            raise ChatTemplateError(
                f"{where}: the chat template renders nothing for the assistant turn messages[{i}] after its "
                f"generation prompt {_clip(before[-_CONTEXT_CHARS:])!r}"
            )
        _check_content(messages[i], text[start:end], i, where)
        spans.append((start, end))
    return text, spans


def _marked_spans(
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[Mapping[str, Any]],
    tools: list[dict] | None,
    encoding: Encoding,
    text: str,
    first_labelled: int,
    where: str,
) -> list[tuple[int, int]]:
    """Character spans of the ``{% generation %}`` blocks, from transformers' assistant token mask.

    The markers say what the template's author wants trained, even where the template rewrites earlier
    turns, so assistant content is not required to appear verbatim; the round-trip checks still apply.
    """
    kwargs: dict[str, Any] = {"tools": tools} if tools is not None else {}
    try:
        out: Any = tokenizer.apply_chat_template(
            cast(Any, list(messages)),
            tokenize=True,
            return_dict=True,
            return_assistant_tokens_mask=True,
            **kwargs,
        )
    except Exception as error:
        raise ChatTemplateError(f"{where}: the chat template failed to render: {error}") from error
    if list(out["input_ids"]) != encoding.ids:
        raise ChatTemplateError(f"{where}: tokenizing with the assistant mask gave different tokens")
    # Labels may only begin where the prompt, rendered with its generation prompt, ends.
    floor = 0
    if first_labelled:
        prompt = _render(
            tokenizer, [messages[:first_labelled]], tools=tools, generation_prompt=True, where=where
        )[0]
        _check_prefix(
            prompt, text, f"messages[:{first_labelled}] with add_generation_prompt=True", None, where
        )
        floor = len(prompt)
    spans: list[tuple[int, int]] = []
    mask = list(out["assistant_masks"])
    index = 0
    while index < len(mask):
        if not mask[index]:
            index += 1
            continue
        run_end = index
        while run_end + 1 < len(mask) and mask[run_end + 1]:
            run_end += 1
        start, end = max(_chars(encoding, index)[0], floor), _chars(encoding, run_end)[1]
        if start < end:
            spans.append((start, end))
        index = run_end + 1
    return spans


# --------------------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------------------


def _check_prefix(prefix: str, text: str, what: str, turn: int | None, where: str) -> None:
    """Fail unless ``prefix`` (the rendering of ``what``) starts the rendered conversation ``text``."""
    if text.startswith(prefix):
        return
    at = _common_prefix_length(prefix, text)
    turn_note = f" (to find assistant turn messages[{turn}])" if turn is not None else ""
    if "add_generation_prompt" in what:
        cause = (
            "the generation prompt differs from how the template renders the start of an assistant turn (for "
            "example it opens a <think> block that stored turns lack), or earlier turns render differently "
            "once later turns follow"
        )
    else:
        cause = (
            "the template renders a turn differently once later turns follow (for example it strips the "
            "reasoning of earlier assistant turns, or treats the last message specially)"
        )
    raise ChatTemplateError(
        f"{where}: rendering {what}{turn_note} is not a prefix of the rendered conversation; they differ at "
        f"character {at}: {_around(prefix, at)!r} vs {_around(text, at)!r}. Probably {cause}, so the "
        "assistant turns cannot be located reliably. Use a chat template that renders every turn the same "
        "way wherever it stands, or one with {% generation %} markers"
    )


def _check_content(message: Mapping[str, Any], rendered: str, turn: int, where: str) -> None:
    """Every piece of text of an assistant message must appear in its rendering."""
    expected: list[str] = []
    content = message.get("content")
    if isinstance(content, str):
        expected.append(content.strip())
    elif isinstance(content, list):  # content parts: [{"type": "text", "text": ...}, ...]
        expected += [
            part["text"].strip()
            for part in content
            if isinstance(part, Mapping) and isinstance(part.get("text"), str)
        ]
    for call in message.get("tool_calls") or ():
        if isinstance(call, Mapping):
            function = call.get("function", call)
            if isinstance(function, Mapping) and isinstance(function.get("name"), str):
                expected.append(function["name"])
    for piece in expected:
        if piece and piece not in rendered and _nfc(piece) not in _nfc(rendered):
            raise ChatTemplateError(
                f"{where}: the chat template does not render assistant turn messages[{turn}] verbatim: "
                f"{_clip(piece)!r} is missing from its rendering {_clip(rendered)!r}"
            )


def _check_round_trip(backend: Tokenizer, input_ids: list[int], text: str, where: str) -> None:
    decoded = backend.decode(input_ids, skip_special_tokens=False)
    if _same_text(decoded, text):
        return
    at = _common_prefix_length(decoded, text)
    raise ChatTemplateError(
        f"{where}: the tokens do not decode back to the rendered text (the tokenizer normalises or drops "
        f"characters): they differ at character {at}, rendered {_around(text, at)!r} vs decoded "
        f"{_around(decoded, at)!r}"
    )


def _check_single_bos(tokenizer: PreTrainedTokenizerBase, input_ids: list[int], where: str) -> None:
    bos = tokenizer.bos_token_id
    if bos is not None and len(input_ids) > 1 and input_ids[0] == bos and input_ids[1] == bos:
        raise ChatTemplateError(
            f"{where}: the rendered conversation starts with two BOS tokens ({tokenizer.bos_token!r}); "
            "the chat template writes the BOS token more than once"
        )


# --------------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------------


def _backend(tokenizer: PreTrainedTokenizerBase) -> Tokenizer:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise TypeError(
            f"{type(tokenizer).__name__} is not a fast tokenizer: labelling needs the character offsets of a "
            "tokenizer backed by the Rust `tokenizers` library (load it with AutoTokenizer)"
        )
    return backend


def _chat_template(tokenizer: PreTrainedTokenizerBase, tools: list[dict] | None, where: str) -> str:
    try:
        return tokenizer.get_chat_template(None, tools)
    except ValueError as error:
        raise ChatTemplateError(f"{where}: the tokenizer has no usable chat template: {error}") from error


@lru_cache(maxsize=16)
def _has_generation_markers(template: str) -> bool:
    return _GENERATION_TAG.search(template) is not None


def _render(
    tokenizer: PreTrainedTokenizerBase,
    conversations: list[Sequence[Mapping[str, Any]]],
    *,
    tools: list[dict] | None,
    generation_prompt: bool,
    where: str,
) -> list[str]:
    """Render a batch of conversations with the tokenizer's chat template."""
    kwargs: dict[str, Any] = {"tools": tools} if tools is not None else {}
    try:
        rendered: list[str] = tokenizer.apply_chat_template(  # type: ignore[assignment]  # tokenize=False: text
            cast(Any, [list(c) for c in conversations]),
            tokenize=False,
            add_generation_prompt=generation_prompt,
            **kwargs,
        )
    except Exception as error:  # jinja2 errors, TypeError on odd content, the template's raise_exception
        raise ChatTemplateError(f"{where}: the chat template failed to render: {error}") from error
    return rendered


def _common_prefix_length(a: str, b: str) -> int:
    """How many leading characters ``a`` and ``b`` share."""
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def _chars(encoding: Encoding, token: int) -> tuple[int, int]:
    """The character span of token ``token`` of a rendered conversation (every token of one has one)."""
    span = encoding.token_to_chars(token)
    if span is None:
        raise ChatTemplateError(f"token {token} of the rendered conversation maps to no characters")
    return span


def _token_range(encoding: Encoding, start: int, end: int) -> tuple[int, int] | None:
    """Indices ``(first, last)`` of the tokens whose characters overlap ``[start, end)``, if any."""
    first = encoding.char_to_token(start)
    last = encoding.char_to_token(end - 1)
    if first is None or last is None:  # a boundary character no token covers (normalisation): scan
        offsets = encoding.offsets
        overlapping = [j for j, (s, e) in enumerate(offsets) if s < end and e > start]
        return (overlapping[0], overlapping[-1]) if overlapping else None
    # One character can be split over several byte-level tokens (an emoji): take all of them.
    while first > 0 and _chars(encoding, first - 1)[1] > start:
        first -= 1
    while last + 1 < len(encoding) and _chars(encoding, last + 1)[0] < end:
        last += 1
    return first, last


def _nfc(text: str) -> str:
    return unicodedata.normalize("NFC", text)


def _same_text(decoded: str, original: str) -> bool:
    """Equal, or canonically equivalent (NFC normalisation only re-encodes the same characters)."""
    return decoded == original or _nfc(decoded) == _nfc(original)


def _describe(messages: Sequence[Mapping[str, Any]]) -> str:
    roles = ", ".join(str(m.get("role")) if isinstance(m, Mapping) else "?" for m in messages)
    return f"conversation [{roles}]"


def _clip(text: str, limit: int = 2 * _CONTEXT_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _around(text: str, at: int) -> str:
    return text[max(0, at - _CONTEXT_CHARS) : at + _CONTEXT_CHARS]


# --------------------------------------------------------------------------------------------------------
# Data files
# --------------------------------------------------------------------------------------------------------

# What happened to a row.
_KEPT, _TRUNCATED, _OVERLONG, _NO_LABELS = "kept", "truncated", "overlong", "no_labels"
_Outcome = tuple[str, TokenizedSample | None]


@dataclass(frozen=True)
class _RowJob:
    """Everything needed to turn numbered JSONL rows into outcomes; picklable for worker processes."""

    tokenizer: Any
    source: str
    max_seq_len: int
    overlong: Overlong
    unmask: bool
    data_format: str = MESSAGES

    def __call__(self, chunk: list[tuple[int, bytes]]) -> list[_Outcome]:
        return [self.row(line_no, raw) for line_no, raw in chunk]

    def row(self, line_no: int, raw: bytes) -> _Outcome:
        where = f"{self.source}:{line_no}"
        try:
            row = json.loads(raw)
        except ValueError as error:  # JSONDecodeError and UnicodeDecodeError
            raise SampleError(f"{where}: not valid JSON: {error}") from None
        problems = check_row(row, self.data_format)
        tools = row.get("tools") if isinstance(row, dict) else None
        if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
            problems.append("tools: expected a list of function schemas (objects)")
        if problems:
            raise SampleError(f"{where}: " + "; ".join(problems))
        if self.data_format == TEXT:
            sample = tokenize_text(row[TEXT], self.tokenizer)
        else:
            sample = _tokenize(
                row[MESSAGES], self.tokenizer, tools=tools, unmask=self.unmask, first_labelled=0, where=where
            )
        weight = float(row.get(WEIGHT, 1.0))
        outcome = _KEPT
        if len(sample.input_ids) > self.max_seq_len:
            if self.overlong == "drop":
                return _OVERLONG, None
            limit = self.max_seq_len
            sample = TokenizedSample(sample.input_ids[:limit], sample.labels[:limit], weight)
            outcome = _TRUNCATED
        elif weight != 1.0:
            sample = TokenizedSample(sample.input_ids, sample.labels, weight)
        # The first token is never predicted, so its label alone teaches nothing.
        if all(label == IGNORE_INDEX for label in sample.labels[1:]):
            return _NO_LABELS, None
        return outcome, sample


class _Collector:
    """Gathers outcomes in order and counts what happened."""

    def __init__(self) -> None:
        self.samples: list[TokenizedSample] = []
        self.counts = {_KEPT: 0, _TRUNCATED: 0, _OVERLONG: 0, _NO_LABELS: 0}

    def add(self, outcomes: list[_Outcome]) -> None:
        for outcome, sample in outcomes:
            self.counts[outcome] += 1
            if sample is not None:
                self.samples.append(sample)

    def dataset(self) -> TokenizedDataset:
        lengths = [len(sample.input_ids) for sample in self.samples]
        kept = len(self.samples)
        stats: dict[str, float] = {
            "samples_read": sum(self.counts.values()),
            "samples_kept": kept,
            "dropped_overlong": self.counts[_OVERLONG],
            "truncated": self.counts[_TRUNCATED],
            "dropped_no_labels": self.counts[_NO_LABELS],
            "tokens": sum(lengths),
            "label_tokens": sum(sample.num_label_tokens for sample in self.samples),
            "max_len": max(lengths, default=0),
            "mean_len": round(sum(lengths) / kept, 2) if kept else 0.0,
        }
        return TokenizedDataset(self.samples, stats)


def _numbered_rows(lines: Iterator[bytes]) -> Iterator[tuple[int, bytes]]:
    """``(line number, raw line)`` of every non-blank line, numbered from 1."""
    for line_no, raw in enumerate(lines, start=1):
        if raw.strip():
            yield line_no, raw


def _chunks(rows: Iterator[tuple[int, bytes]], size: int) -> Iterator[list[tuple[int, bytes]]]:
    while chunk := list(islice(rows, size)):
        yield chunk


def _map_in_workers(
    job: _RowJob, chunks: Iterator[list[tuple[int, bytes]]], num_workers: int
) -> Iterator[list[_Outcome]]:
    """``map(job, chunks)`` in a pool of worker processes, in order, with a bounded number of chunks in flight.

    On Linux the workers are forked: they start at once and share the parent's tokenizer, whereas a spawned
    worker first spends seconds importing transformers. The workers only render templates and run the Rust
    tokenizer, never torch or CUDA, which is what makes forking a process that has started such threads
    safe here (PyTorch's DataLoader forks its workers the same way). Elsewhere they are spawned (forking is
    unsafe on macOS), and the caller's ``__main__`` must then be importable. A worker that dies makes the
    pool raise ``BrokenProcessPool`` rather than hang.
    """
    context = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    chunks = iter(chunks)
    with ProcessPoolExecutor(
        num_workers, mp_context=context, initializer=_init_worker, initargs=(job,)
    ) as pool:
        pending: deque[Future[list[_Outcome]]] = deque()
        try:
            # A forking pool starts every worker at its first submission. Freezing the collector's view of
            # the parent's objects meanwhile keeps the workers' garbage collections off them, so that the
            # pages they share with the parent are not copied (a parent holding a large dataset would
            # otherwise slow every worker down).
            gc.freeze()
            try:
                pending.extend(pool.submit(_run_worker_chunk, chunk) for chunk in islice(chunks, 1))
            finally:
                gc.unfreeze()
            for chunk in chunks:
                pending.append(pool.submit(_run_worker_chunk, chunk))
                if len(pending) >= _CHUNKS_IN_FLIGHT_PER_WORKER * num_workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:  # after an error: do not wait for chunks nobody will read
                future.cancel()


# The job of a worker process, set once by the pool's initializer.
_WORKER_JOB: _RowJob | None = None


def _init_worker(job: _RowJob) -> None:
    global _WORKER_JOB
    _WORKER_JOB = job


def _run_worker_chunk(chunk: list[tuple[int, bytes]]) -> list[_Outcome]:
    if _WORKER_JOB is None:
        raise RuntimeError("worker used before _init_worker")
    return _WORKER_JOB(chunk)
