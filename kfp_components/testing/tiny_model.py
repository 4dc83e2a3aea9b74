"""Build tiny, randomly initialised causal language models for tests and demos.

Nothing in this project's tests or demo may download anything (no Hugging Face Hub, no internet), yet
the components and the training engine need real checkpoints to load, tokenize with, train and save.
Every test and the demo therefore use models built by this module: a small ``Qwen2ForCausalLM`` or
``LlamaForCausalLM`` with random weights and a byte-level BPE tokenizer that is *trained locally* on a
small English corpus generated deterministically in code.

The result is saved in the standard Hugging Face layout (``config.json``, ``model.safetensors``,
``generation_config.json``, ``tokenizer.json``, ``tokenizer_config.json``, ``chat_template.jinja``), so
plain ``transformers`` loads it offline without any project code::

    AutoModelForCausalLM.from_pretrained(path)
    AutoTokenizer.from_pretrained(path)

Each architecture mimics its real family so the engine meets the same quirks it meets in production:

* ``qwen2``: ChatML special tokens (``<|endoftext|>`` is the pad token, ``<|im_end|>`` the EOS token),
  the Qwen2.5 pre-tokenizer (single digits, NFC normalisation) and a Qwen2.5-style chat template with
  system/user/assistant/tool roles and tool calls.
* ``llama``: Llama-3 special tokens (``<|begin_of_text|>`` added as BOS by the tokenizer,
  ``<|start_header_id|>``, ``<|end_header_id|>``, ``<|eot_id|>`` as EOS, ``<|finetune_right_pad_id|>``
  as pad), the Llama-3 pre-tokenizer (digits in groups of three) and a Llama-3.1-style chat template.

The chat templates are plain Qwen/Llama templates: they deliberately contain no ``{% generation %}``
markers, because the training engine must cope with templates as they are found in the wild.

Builds are deterministic: the same arguments give byte-identical ``model.safetensors`` and
``tokenizer.json``. The seed only drives the weights; the tokenizer depends on the architecture and
vocabulary size alone, so models built with different seeds share a tokenizer.

Command line::

    python -m kfp_components.testing.tiny_model OUT --arch qwen2 --seed 0

Tests should prefer :func:`tiny_model_path`, which builds each configuration once into a cache folder
and reuses it.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import random
import shutil
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import tokenizers
import torch
import transformers
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers.trainers import BpeTrainer
from transformers import (
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

__all__ = [
    "ARCHS",
    "Arch",
    "TinyModelSpec",
    "build_corpus",
    "build_tiny_model",
    "build_tokenizer",
    "chat_template",
    "default_cache_dir",
    "main",
    "tiny_model_path",
]

Arch = Literal["qwen2", "llama"]
ARCHS: tuple[Arch, ...] = ("qwen2", "llama")

#: Bump whenever the builder's output changes, so that cached models are rebuilt.
BUILDER_VERSION = 1

#: Environment variable naming the project's cache root (default ``~/.cache/kfp_components``).
CACHE_ENV_VAR = "KFP_COMPONENTS_CACHE"

# The corpus is fixed (it does not depend on the model seed), so every seed shares one tokenizer.
_CORPUS_SEED = 1234
_CORPUS_LINES = 4000

# Pre-tokenizer patterns of the real families: Qwen2 splits digits one by one, Llama 3 in groups of three.
_QWEN2_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@dataclasses.dataclass(frozen=True)
class _ArchInfo:
    """What distinguishes one architecture family from another."""

    split_pattern: str
    nfc: bool
    special_tokens: tuple[str, ...]
    bos_token: str | None
    eos_token: str
    pad_token: str
    extra_eos_tokens: tuple[str, ...]
    tokenizer_class: str


_QWEN2 = _ArchInfo(
    split_pattern=_QWEN2_SPLIT_PATTERN,
    nfc=True,
    special_tokens=("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
    bos_token=None,
    eos_token="<|im_end|>",
    pad_token="<|endoftext|>",
    extra_eos_tokens=("<|endoftext|>",),
    tokenizer_class="Qwen2Tokenizer",
)
_LLAMA = _ArchInfo(
    split_pattern=_LLAMA3_SPLIT_PATTERN,
    nfc=False,
    special_tokens=(
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eot_id|>",
        "<|finetune_right_pad_id|>",
    ),
    bos_token="<|begin_of_text|>",
    eos_token="<|eot_id|>",
    pad_token="<|finetune_right_pad_id|>",
    extra_eos_tokens=("<|end_of_text|>",),
    tokenizer_class="PreTrainedTokenizerFast",
)
_ARCH_INFO: dict[str, _ArchInfo] = {"qwen2": _QWEN2, "llama": _LLAMA}


@dataclasses.dataclass(frozen=True)
class TinyModelSpec:
    """Every argument that determines a tiny model's files (used for validation and cache keys)."""

    arch: Arch = "qwen2"
    seed: int = 0
    vocab_size: int = 1024
    hidden_size: int = 64
    num_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    intermediate_size: int = 128
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    default_system_prompt: str | None = None

    def __post_init__(self) -> None:
        if self.arch not in _ARCH_INFO:
            raise ValueError(f"arch must be one of {ARCHS}, got {self.arch!r}")
        if self.seed < 0:
            raise ValueError(f"seed must be non-negative, got {self.seed}")
        sizes = (
            "hidden_size",
            "num_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "intermediate_size",
            "max_position_embeddings",
        )
        for name in sizes:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("hidden_size must be divisible by num_attention_heads")
        if (self.hidden_size // self.num_attention_heads) % 2:
            raise ValueError("the head dimension (hidden_size / num_attention_heads) must be even for RoPE")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be divisible by num_key_value_heads")
        minimum_vocab = 256 + len(_ARCH_INFO[self.arch].special_tokens)
        if self.vocab_size < minimum_vocab:
            raise ValueError(f"vocab_size must be at least {minimum_vocab} (256 bytes + special tokens)")

    def cache_key(self) -> str:
        """A short, stable hash of the spec and of everything else that shapes the saved files."""
        payload = {
            "spec": dataclasses.asdict(self),
            "builder_version": BUILDER_VERSION,
            "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__,
            "torch": torch.__version__,
        }
        blob = json.dumps(payload, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


# --------------------------------------------------------------------------------------------------------
# Corpus
# --------------------------------------------------------------------------------------------------------

_CAPITALS = {
    "France": "Paris",
    "Spain": "Madrid",
    "Italy": "Rome",
    "Germany": "Berlin",
    "Japan": "Tokyo",
    "Canada": "Ottawa",
    "Egypt": "Cairo",
    "Kenya": "Nairobi",
    "Brazil": "Brasília",
    "Peru": "Lima",
    "Norway": "Oslo",
    "Poland": "Warsaw",
    "Greece": "Athens",
    "Portugal": "Lisbon",
    "Austria": "Vienna",
    "Mexico": "Mexico City",
    "India": "New Delhi",
    "China": "Beijing",
    "Australia": "Canberra",
    "Türkiye": "Ankara",
}
_ANIMALS = {
    "cat": ("mammal", "meows"),
    "dog": ("mammal", "barks"),
    "cow": ("mammal", "moos"),
    "horse": ("mammal", "neighs"),
    "duck": ("bird", "quacks"),
    "owl": ("bird", "hoots"),
    "frog": ("amphibian", "croaks"),
    "snake": ("reptile", "hisses"),
    "lion": ("mammal", "roars"),
    "bee": ("insect", "buzzes"),
}
_THINGS = {
    "sky": "blue",
    "grass": "green",
    "snow": "white",
    "coal": "black",
    "banana": "yellow",
    "tomato": "red",
    "orange": "orange",
    "violet": "purple",
}
_NAMES = ("Alice", "Bob", "Carol", "Dave", "Eve", "Frank", "Grace", "Heidi", "Zoë", "José", "Søren", "Aiko")
_VERBS = ("likes", "reads", "writes", "paints", "visits", "studies", "remembers", "answers")
_OBJECTS = ("books", "letters", "the news", "old maps", "poems", "questions", "a small garden", "the museum")
_UNICODE_SNIPPETS = (
    "Café au lait costs 3 €.",
    "The naïve coöperative façade was déjà vu.",
    "Straße in München.",
    "こんにちは、世界。",
    "Привет, мир!",
    "你好，世界！",  # noqa: RUF001 (full-width punctuation on purpose)
    "The temperature is 21 °C ± 2.",
    "I ❤️ tiny models 🤖🚀.",
    "π ≈ 3.14159 and e ≈ 2.71828.",
)


def _words(text: str) -> tuple[str, ...]:
    return tuple(text.split())


_ADJECTIVES = _words(
    "quiet bright ancient curious gentle heavy narrow rapid simple strange famous hungry patient wooden "
    "golden frozen careful distant friendly modern"
)
_NOUNS = _words(
    "river mountain library teacher engineer village window journey problem computer kitchen garden "
    "market station bridge forest student doctor keyboard question picture planet harbour festival "
    "language machine"
)
_ACTIONS = _words(
    "explained discovered carried followed described repaired measured imagined observed collected "
    "translated protected delivered compared finished organised"
)
_GREETINGS = ("Hi!", "Hello there.", "Good morning!", "Hey, can you help me?", "Thanks a lot!")
_TOOLS = (
    ("get_weather", "city"),
    ("get_capital", "country"),
    ("add_numbers", "a"),
    ("lookup_word", "word"),
)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _fact_line(rng: random.Random) -> str:
    country, capital = rng.choice(sorted(_CAPITALS.items()))
    animal, (kind, sound) = rng.choice(sorted(_ANIMALS.items()))
    thing, color = rng.choice(sorted(_THINGS.items()))
    return rng.choice(
        (
            f"The capital of {country} is {capital}.",
            f"{capital} is the capital city of {country}.",
            f"{_article(animal).capitalize()} {animal} is {_article(kind)} {kind}, and it {sound}.",
            f"The {thing} is {color}.",
            f"Most people say the {thing} looks {color}.",
        )
    )


def _arithmetic_line(rng: random.Random) -> str:
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    op = rng.choice(("+", "-", "*"))
    result = {"+": a + b, "-": a - b, "*": a * b}[op]
    word = {"+": "plus", "-": "minus", "*": "times"}[op]
    return rng.choice(
        (
            f"{a} {op} {b} = {result}",
            f"What is {a} {word} {b}? The answer is {result}.",
            f"Q: {a} {op} {b}\nA: {result}",
        )
    )


def _qa_line(rng: random.Random) -> str:
    country, capital = rng.choice(sorted(_CAPITALS.items()))
    animal, (_, sound) = rng.choice(sorted(_ANIMALS.items()))
    return rng.choice(
        (
            f"Question: What is the capital of {country}?\nAnswer: {capital}.",
            f"Question: Which animal {sound}?\nAnswer: The {animal}.",
            f"Question: Is {capital} in {country}?\nAnswer: Yes, it is.",
        )
    )


def _story_line(rng: random.Random) -> str:
    name, other = rng.sample(_NAMES, 2)
    return (
        f"{name} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} every {rng.choice(('day', 'week', 'year'))}, "
        f"but {other} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}."
    )


def _sentence_line(rng: random.Random) -> str:
    subject, thing = rng.sample(_NOUNS, 2)
    return (
        f"The {rng.choice(_ADJECTIVES)} {subject} {rng.choice(_ACTIONS)} "
        f"{rng.choice(('a', 'the', 'every', 'one'))} {rng.choice(_ADJECTIVES)} {thing}."
    )


def _chat_line(rng: random.Random) -> str:
    country, capital = rng.choice(sorted(_CAPITALS.items()))
    return rng.choice(
        (
            f"system\nYou are a helpful assistant.\nuser\n{rng.choice(_GREETINGS)}\nassistant\nHello! How can I help you today?",
            f"user\nWhat is the capital of {country}?\nassistant\nThe capital of {country} is {capital}.",
            f"User: {rng.choice(_GREETINGS)}\nAssistant: Of course, I am happy to help.",
            "You are a helpful assistant. Answer briefly and politely.",
        )
    )


def _tool_line(rng: random.Random) -> str:
    tool, arg = rng.choice(_TOOLS)
    value = rng.choice((*_CAPITALS.values(), *_CAPITALS.keys(), "42", "apple"))
    call = json.dumps({"name": tool, "arguments": {arg: value}}, ensure_ascii=False)
    return rng.choice(
        (
            f"<tool_call>\n{call}\n</tool_call>",
            f'<tool_response>\n{{"result": "{value}"}}\n</tool_response>',
            json.dumps({"type": "function", "function": {"name": tool, "parameters": {arg: "string"}}}),
        )
    )


def _code_line(rng: random.Random) -> str:
    name = rng.choice(("add", "total", "combine", "merge"))
    return rng.choice(
        (
            f"def {name}(a, b):\n    return a + b",
            f"for i in range({rng.randint(1, 20)}):\n    print(i)",
            f"x = [{', '.join(str(rng.randint(0, 9)) for _ in range(5))}]",
        )
    )


def _unicode_line(rng: random.Random) -> str:
    return rng.choice(_UNICODE_SNIPPETS)


_LINE_MAKERS: tuple[Callable[[random.Random], str], ...] = (
    _fact_line,
    _arithmetic_line,
    _qa_line,
    _story_line,
    _sentence_line,
    _chat_line,
    _tool_line,
    _code_line,
    _unicode_line,
)


def build_corpus(num_lines: int = _CORPUS_LINES, seed: int = _CORPUS_SEED) -> list[str]:
    """Generate a small, deterministic English corpus to train the tokenizer on.

    The lines mix templated facts, arithmetic (``"12 + 7 = 19"``), question/answer pairs, short stories,
    chat-like exchanges, tool-call JSON, a little code and some non-ASCII text.
    """
    rng = random.Random(seed)
    lines: list[str] = []
    while len(lines) < num_lines:
        make_line = _LINE_MAKERS[len(lines) % len(_LINE_MAKERS)]
        lines.append(make_line(rng))
    return lines


# --------------------------------------------------------------------------------------------------------
# Tokenizer and chat templates
# --------------------------------------------------------------------------------------------------------

_QWEN2_CHAT_TEMPLATE = """\
{%- set default_system = __DEFAULT_SYSTEM__ %}
{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- elif default_system %}
        {{- default_system }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- elif messages[0]['role'] == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
{%- elif default_system %}
    {{- '<|im_start|>system\\n' + default_system + '<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

_LLAMA_CHAT_TEMPLATE = """\
{{- bos_token }}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] | trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = __DEFAULT_SYSTEM__ %}
{%- endif %}
{%- if system_message or tools %}
    {{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}
    {%- if tools %}
        {{- 'You have access to the following functions. To call a function, respond with JSON for a function call of the form {"name": function name, "parameters": dictionary of argument name and its value}.\\n\\n' }}
        {%- for tool in tools %}
            {{- tool | tojson(indent=4) }}
            {{- '\\n\\n' }}
        {%- endfor %}
    {%- endif %}
    {%- if system_message %}
        {{- system_message }}
    {%- endif %}
    {{- '<|eot_id|>' }}
{%- endif %}
{%- for message in messages %}
    {%- if message.role == 'assistant' and message.tool_calls %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '{"name": "' + tool_call.name + '", "parameters": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}' }}
        {%- endfor %}
        {{- '<|eot_id|>' }}
    {%- elif message.role == 'tool' or message.role == 'ipython' %}
        {{- '<|start_header_id|>ipython<|end_header_id|>\\n\\n' }}
        {%- if message.content is mapping or (message.content is iterable and message.content is not string) %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- '<|eot_id|>' }}
    {%- else %}
        {{- '<|start_header_id|>' + message.role + '<|end_header_id|>\\n\\n' + message.content | trim + '<|eot_id|>' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""


def chat_template(arch: Arch, default_system_prompt: str | None = None) -> str:
    """The Jinja chat template for ``arch``.

    ``default_system_prompt`` is rendered when a conversation has no system message (as Qwen2.5 does with
    "You are Qwen, created by Alibaba Cloud..."); ``None`` renders no system turn in that case.
    """
    template = {"qwen2": _QWEN2_CHAT_TEMPLATE, "llama": _LLAMA_CHAT_TEMPLATE}[arch]
    # A JSON string literal is a valid Jinja string literal; ``none`` disables the default.
    literal = "none" if default_system_prompt is None else json.dumps(default_system_prompt)
    return template.replace("__DEFAULT_SYSTEM__", literal)


def build_tokenizer(
    arch: Arch = "qwen2", vocab_size: int = 1024, default_system_prompt: str | None = None
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer for ``arch`` on :func:`build_corpus` and wrap it for transformers.

    The learned vocabulary plus the architecture's special tokens add up to ``vocab_size``, unless the
    small corpus runs out of merges first (around 1,200 tokens): the tokenizer is then smaller. Being
    byte-level, it round-trips any text; the ``qwen2`` variant NFC-normalises first, as the real Qwen2
    tokenizer does.
    """
    info = _ARCH_INFO[arch]
    tokenizer = Tokenizer(models.BPE())
    if info.nfc:
        tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(info.split_pattern), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(
        vocab_size=vocab_size - len(info.special_tokens),
        min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(build_corpus(), trainer=trainer)
    # Special tokens go after the learned vocabulary, as in the real Qwen2 and Llama 3 vocabularies.
    tokenizer.add_special_tokens(
        [AddedToken(token, special=True, normalized=False) for token in info.special_tokens]
    )
    if info.bos_token is not None:
        bos_id = tokenizer.token_to_id(info.bos_token)
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{info.bos_token} $A",
            pair=f"{info.bos_token} $A {info.bos_token}:1 $B:1",
            special_tokens=[(info.bos_token, bos_id)],
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=info.bos_token,
        eos_token=info.eos_token,
        pad_token=info.pad_token,
        chat_template=chat_template(arch, default_system_prompt),
        clean_up_tokenization_spaces=False,
    )


# --------------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------------


def _model_config(spec: TinyModelSpec, tokenizer: PreTrainedTokenizerFast) -> Qwen2Config | LlamaConfig:
    info = _ARCH_INFO[spec.arch]
    common: dict[str, Any] = {
        # At least the tokenizer's size; larger when the corpus could not fill ``vocab_size``, which leaves
        # unused embedding rows exactly as real Qwen2.5 checkpoints have.
        "vocab_size": max(spec.vocab_size, len(tokenizer)),
        "hidden_size": spec.hidden_size,
        "num_hidden_layers": spec.num_layers,
        "num_attention_heads": spec.num_attention_heads,
        "num_key_value_heads": spec.num_key_value_heads,
        "intermediate_size": spec.intermediate_size,
        "max_position_embeddings": spec.max_position_embeddings,
        "tie_word_embeddings": spec.tie_word_embeddings,
        "initializer_range": spec.initializer_range,
        "eos_token_id": tokenizer.convert_tokens_to_ids(info.eos_token),
        "pad_token_id": tokenizer.convert_tokens_to_ids(info.pad_token),
        "dtype": "float32",
    }
    if spec.arch == "qwen2":
        # Like Qwen2.5: "bos" is <|endoftext|> in the config although the tokenizer never adds one.
        return Qwen2Config(bos_token_id=_token_id(tokenizer, "<|endoftext|>"), **common)
    return LlamaConfig(bos_token_id=_token_id(tokenizer, info.bos_token), **common)


def _token_id(tokenizer: PreTrainedTokenizerFast, token: str | None) -> int:
    token_id = tokenizer.convert_tokens_to_ids(token or "")
    if not isinstance(token_id, int):
        raise ValueError(f"the tiny tokenizer has no token {token!r}")
    return token_id


def _init_weights(model: PreTrainedModel, seed: int, std: float) -> None:
    """Re-initialise every parameter from a private generator: N(0, std) matrices, zero biases, unit norms."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2:
                param.copy_(torch.randn(param.shape, generator=generator, dtype=torch.float32) * std)
            elif name.endswith(".bias"):
                param.zero_()
            elif "norm" in name:
                param.fill_(1.0)
            else:
                raise ValueError(f"Do not know how to initialise parameter {name!r}")


def _build_model(spec: TinyModelSpec, tokenizer: PreTrainedTokenizerFast) -> PreTrainedModel:
    config = _model_config(spec, tokenizer)
    # Construction draws from the global RNG; fork it so callers' random state is left untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        model = (
            Qwen2ForCausalLM(config) if isinstance(config, Qwen2Config) else LlamaForCausalLM(config)
        ).float()
    _init_weights(model, spec.seed, config.initializer_range)
    model.eval()

    info = _ARCH_INFO[spec.arch]
    eos_ids = [tokenizer.convert_tokens_to_ids(t) for t in (info.eos_token, *info.extra_eos_tokens)]
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=eos_ids,
        pad_token_id=config.pad_token_id,
    )
    return model


def _rewrite_tokenizer_config(out_dir: Path, spec: TinyModelSpec) -> None:
    """Name the tokenizer class the real family uses and cap ``model_max_length`` at the context size."""
    path = out_dir / "tokenizer_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config["tokenizer_class"] = _ARCH_INFO[spec.arch].tokenizer_class
    config["model_max_length"] = spec.max_position_embeddings
    path.write_text(json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def _build(out_dir: Path, spec: TinyModelSpec) -> tuple[Path, PreTrainedModel]:
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(spec.arch, spec.vocab_size, spec.default_system_prompt)
    model = _build_model(spec, tokenizer)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    _rewrite_tokenizer_config(out_dir, spec)
    return out_dir, model


def build_tiny_model(
    out_dir: str | os.PathLike[str],
    arch: Arch = "qwen2",
    seed: int = 0,
    *,
    vocab_size: int = 1024,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    intermediate_size: int = 128,
    max_position_embeddings: int = 2048,
    tie_word_embeddings: bool = False,
    initializer_range: float = 0.02,
    default_system_prompt: str | None = None,
) -> Path:
    """Build a tiny ``arch`` causal LM with random weights and a locally trained tokenizer into ``out_dir``.

    The model's ``vocab_size`` is ``vocab_size``; the tokenizer has that many tokens too unless the corpus
    runs out of merges (see :func:`build_tokenizer`). The same arguments always give byte-identical
    ``model.safetensors`` and ``tokenizer.json``; ``seed`` only changes the weights. Returns ``out_dir``
    as a :class:`~pathlib.Path`.
    """
    spec = TinyModelSpec(
        arch=arch,
        seed=seed,
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_layers=num_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        initializer_range=initializer_range,
        default_system_prompt=default_system_prompt,
    )
    path, _ = _build(Path(out_dir), spec)
    return path


# --------------------------------------------------------------------------------------------------------
# Cache for tests
# --------------------------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """``$KFP_COMPONENTS_CACHE/tiny_models``, by default ``~/.cache/kfp_components/tiny_models``."""
    root = os.environ.get(CACHE_ENV_VAR) or "~/.cache/kfp_components"
    return Path(root).expanduser() / "tiny_models"


def tiny_model_path(
    arch: Arch = "qwen2",
    seed: int = 0,
    cache_dir: str | os.PathLike[str] | None = None,
    **overrides: Any,
) -> Path:
    """Return a cached tiny model folder, building it on first use.

    The folder is ``<cache_dir>/<arch>-<seed>-<hash>``, where the hash covers every build argument
    (``overrides`` are passed to :func:`build_tiny_model`) and the library versions. The model is built
    in a temporary sibling folder and renamed into place atomically, so concurrent test processes never
    see a half-written model; a process that loses the race discards its copy and uses the winner's.
    """
    spec = TinyModelSpec(arch=arch, seed=seed, **overrides)
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = root / f"{arch}-{seed}-{spec.cache_key()}"
    if target.is_dir():
        return target

    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=root))
    try:
        _build(staging, spec)
        try:
            staging.rename(target)
        except OSError:
            # Another process finished first: its folder is complete, so use it.
            if not target.is_dir():
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


# --------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    defaults = TinyModelSpec()
    parser = argparse.ArgumentParser(
        prog="python -m kfp_components.testing.tiny_model",
        description="Build a tiny random causal LM with a locally trained tokenizer (no downloads).",
    )
    parser.add_argument("out", type=Path, help="output folder (created if missing)")
    parser.add_argument("--arch", choices=ARCHS, default=defaults.arch)
    parser.add_argument("--seed", type=int, default=defaults.seed, help="weight initialisation seed")
    parser.add_argument("--vocab-size", type=int, default=defaults.vocab_size)
    parser.add_argument("--hidden-size", type=int, default=defaults.hidden_size)
    parser.add_argument("--layers", type=int, default=defaults.num_layers, dest="num_layers")
    parser.add_argument("--heads", type=int, default=defaults.num_attention_heads, dest="num_attention_heads")
    parser.add_argument(
        "--kv-heads", type=int, default=defaults.num_key_value_heads, dest="num_key_value_heads"
    )
    parser.add_argument("--intermediate-size", type=int, default=defaults.intermediate_size)
    parser.add_argument("--max-position-embeddings", type=int, default=defaults.max_position_embeddings)
    parser.add_argument("--tie-word-embeddings", action="store_true", default=defaults.tie_word_embeddings)
    parser.add_argument("--initializer-range", type=float, default=defaults.initializer_range)
    parser.add_argument(
        "--default-system-prompt",
        default=defaults.default_system_prompt,
        help="system prompt the chat template renders when a conversation has none (default: none)",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point: build a model and print where it went and how big it is."""
    args = vars(_parse_args(argv))
    out = args.pop("out")
    try:
        spec = TinyModelSpec(**args)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    transformers.utils.logging.disable_progress_bar()
    path, model = _build(out, spec)
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"Built tiny {spec.arch} model (seed {spec.seed}, {n_params:,} parameters, "
        f"vocab {model.config.vocab_size}) at {path.resolve()}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
