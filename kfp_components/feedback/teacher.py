"""A teacher: an LLM that writes step-by-step solutions to problems, several samples per problem.

The teacher is reached through the backend of :class:`TeacherOptions`, the same two a judge has:

* ``openai``: any OpenAI-compatible endpoint (vLLM, KServe, TGI, a hosted API) through
  :class:`~kfp_components.feedback.endpoint.OpenAIChatClient`: one chat request per problem asking for
  ``num_samples`` choices (``n``), up to ``max_concurrency`` requests in flight, retried, timed out and bounded
  by ``max_requests`` as the client does for judges.
* ``local``: a Hugging Face causal LM sampled with the RL engine's rollout code
  (:class:`~kfp_components.trainer.rollout.HFRollouts`): the prompt rendered with the tokenizer's chat template,
  ``batch_size`` problems per generate call, ``num_samples`` completions each. A temperature of 0 decodes
  greedily (``top_k`` 1).

What the teacher is sent for a problem row: ``system_prompt`` (when not empty) as a system message, then the
row's prompt. A text prompt becomes one user message, ``prompt_template`` rendered with ``{prompt}`` (the text)
and any column of the row (``{answer}`` would give the answer away; nothing stops it). A messages prompt (a
list) is sent as its turns, its last user turn's content rendered through the template.

Every problem has its own seed, derived from the run's seed and the problem's index
(:func:`problem_seed`): the endpoint gets it as ``seed`` and the local sampler draws from it, so a problem's
samples do not depend on which other problems share its batch, and a resumed run asks what an uninterrupted
one would.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kfp_components.feedback.endpoint import ModelOptions
from kfp_components.feedback.templates import placeholders
from kfp_components.typed_config import ConfigError

DEFAULT_TEACHER_SYSTEM_PROMPT = (
    "You are a careful teacher. Solve the problem step by step: show your reasoning, one step per line. "
    "End with a final line of the form '#### <answer>' holding only the final answer."
)

#: The teacher's usage counters, as :meth:`Teacher.usage` gives them.
USAGE_COUNTERS = (
    "requests",
    "retries",
    "failures",
    "malformed",
    "prompt_tokens",
    "completion_tokens",
    "seconds",
)


@dataclass
class TeacherOptions(ModelOptions):
    """A teacher that writes step-by-step solutions.

    Attributes:
        backend: openai (an OpenAI-compatible endpoint at base_url) or local (a Hugging Face causal LM).
        model: openai: the served model's name (as /v1/models lists it); local: a folder or hub id.
        system_prompt: A system message sent before each problem (empty: none); the default asks for
            reasoning and a final line "#### <answer>".
        prompt_template: The user message of a problem: {prompt} (required) is the problem's text; any column
            of the problem rows may be used.
        num_samples: Traces sampled per problem.
        temperature: Sampling temperature; above 0 when num_samples > 1 (else the samples are one). 0: greedy.
        top_p: Nucleus sampling: the smallest set of tokens holding this much probability (1: off).
        max_tokens: Most tokens of one trace.
        batch_size: local: problems per generate call.
        device: local: the teacher's device (cpu, cuda:0); empty: a GPU when there is one, else the CPU.
        dtype: local: the weights' dtype (float32, bfloat16, float16, auto).
    """

    system_prompt: str = DEFAULT_TEACHER_SYSTEM_PROMPT
    prompt_template: str = "{prompt}"
    num_samples: int = 4
    temperature: float = 0.7
    top_p: float = 1.0
    max_tokens: int = 512

    def validate(self) -> None:
        problems = self.model_problems()
        problems += template_problems(self.prompt_template)
        if self.num_samples < 1:
            problems.append(("num_samples", f"must be at least 1, got {self.num_samples}"))
        if not math.isfinite(self.temperature) or self.temperature < 0:
            problems.append(("temperature", f"must be a finite number >= 0, got {self.temperature}"))
        elif self.temperature == 0 and self.num_samples > 1:
            problems.append(
                (
                    "temperature",
                    f"0 decodes greedily, so the {self.num_samples} samples of a problem would be one: "
                    "set temperature above 0 or num_samples to 1",
                )
            )
        if not 0 < self.top_p <= 1:
            problems.append(("top_p", f"must be in (0, 1], got {self.top_p}"))
        if self.max_tokens < 1:
            problems.append(("max_tokens", f"must be at least 1, got {self.max_tokens}"))
        if problems:
            raise ConfigError.of(problems)


def template_problems(template: str, key: str = "prompt_template") -> list[tuple[str, str]]:
    """What is wrong with a teacher's prompt template (it must parse and contain ``{prompt}``)."""
    if not template.strip():
        return [(key, "is empty; it must contain {prompt}")]
    try:
        names = placeholders(template, key)
    except ConfigError as exc:
        return exc.problems
    if "prompt" not in names:
        shown = ", ".join("{" + name + "}" for name in names) or "no placeholder"
        return [(key, f"must contain {{prompt}} (where the problem goes); it has {shown}")]
    return []


def render_prompt(template: str, text: str, columns: Mapping[str, Any]) -> str:
    """``template`` with ``{prompt}`` = ``text`` and the row's other ``columns``; an unknown placeholder is a
    :class:`ConfigError` at ``prompt_template`` naming the columns the rows have."""
    available = {name: value if isinstance(value, str) else str(value) for name, value in columns.items()}
    available["prompt"] = text
    unknown = [name for name in placeholders(template, "prompt_template") if name not in available]
    if unknown:
        have = ", ".join(sorted(name for name in columns if name != "prompt")) or "none"
        raise ConfigError(
            "prompt_template",
            f"placeholder {{{unknown[0]}}} is neither {{prompt}} nor a column of the problem rows ({have})",
        )
    return template.format_map(available)


def student_turns(options: TeacherOptions, row: Mapping[str, Any]) -> list[dict[str, str]]:
    """The problem's turns as the teacher is sent them, without the system prompt: what the student sees."""
    prompt = row["prompt"]
    columns = {name: value for name, value in row.items() if name != "prompt"}
    if isinstance(prompt, str):
        return [{"role": "user", "content": render_prompt(options.prompt_template, prompt, columns)}]
    turns = [{"role": str(m["role"]), "content": str(m["content"])} for m in prompt]
    last_user = max(i for i, turn in enumerate(turns) if turn["role"] == "user")
    turns[last_user]["content"] = render_prompt(options.prompt_template, turns[last_user]["content"], columns)
    return turns


def conversation(options: TeacherOptions, row: Mapping[str, Any]) -> list[dict[str, str]]:
    """What the teacher is sent for a problem row: the system prompt, then :func:`student_turns`."""
    turns = student_turns(options, row)
    if options.system_prompt and turns[0]["role"] != "system":
        turns = [{"role": "system", "content": options.system_prompt}, *turns]
    return turns


def problem_seed(seed: int, index: int) -> int:
    """The sampling seed of problem ``index`` (0-based) of a run seeded with ``seed``."""
    digest = hashlib.sha256(f"teacher:{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**31 - 1)


class Teacher:
    """Samples ``num_samples`` traces per problem from the backend of ``options`` (see the module docstring).

    ``device`` is where a local teacher loads when its options name none; an endpoint ignores it.
    """

    def __init__(self, options: TeacherOptions, *, device: str = "cpu"):
        options.validate()
        self.options = options
        self.device = options.device or device
        self._client: Any = None
        self._local: Any = None
        self._counts = dict.fromkeys(USAGE_COUNTERS, 0.0)
        if options.backend == "openai":
            from kfp_components.feedback.endpoint import OpenAIChatClient

            self._client = OpenAIChatClient(options, role="teacher")

    def check(self) -> None:
        """An endpoint: ``/v1/models`` lists the model (else a FeedbackError listing what it serves). A local
        teacher: the tokenizer and the model load, and the tokenizer has a chat template."""
        if self._client is not None:
            self._client.check()
        else:
            self._load()

    def solve(
        self, rows: Sequence[Mapping[str, Any]], seed: int, *, indices: Sequence[int] | None = None
    ) -> list[list[str | None]]:
        """``num_samples`` traces per problem row, in row order; None where an endpoint's reply lacked a
        choice. ``indices``: each row's problem index (default 0, 1, ...), which with ``seed`` makes its
        sampling seed (:func:`problem_seed`)."""
        if not rows:
            return []
        positions = list(range(len(rows))) if indices is None else list(indices)
        if len(positions) != len(rows):
            raise ValueError(f"solve: {len(positions)} indices for {len(rows)} rows")
        seeds = [problem_seed(seed, index) for index in positions]
        conversations = [conversation(self.options, row) for row in rows]
        if self._client is not None:
            return self._solve_endpoint(conversations, seeds)
        return self._solve_local(conversations, seeds)

    def _solve_endpoint(
        self, conversations: list[list[dict[str, str]]], seeds: list[int]
    ) -> list[list[str | None]]:
        options = self.options
        replies = self._client.complete(
            conversations,
            max_tokens=options.max_tokens,
            temperature=options.temperature,
            top_p=options.top_p,
            n=options.num_samples,
            seed=seeds,
        )
        return [list(reply.texts) for reply in replies]

    def _load(self) -> tuple[Any, Any]:
        if self._local is not None:
            return self._local
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from kfp_components.trainer.rollout import HFRollouts

        name = self.options.model
        where = torch.device(self.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        tokenizer = AutoTokenizer.from_pretrained(name)
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                f"{name}: the tokenizer has no chat template; a local teacher renders problems with it"
            )
        dtype = self.options.dtype
        loaded = AutoModelForCausalLM.from_pretrained(
            name, dtype="auto" if dtype == "auto" else getattr(torch, dtype)
        )
        model = loaded.to(where).eval()  # type: ignore[arg-type]
        model.requires_grad_(False)
        self._local = (tokenizer, HFRollouts(model, tokenizer, where))
        return self._local

    def _solve_local(
        self, conversations: list[list[dict[str, str]]], seeds: list[int]
    ) -> list[list[str | None]]:
        from kfp_components.trainer.rollout import SamplingOptions

        tokenizer, rollouts = self._load()
        options = self.options
        greedy = options.temperature == 0
        sampling = SamplingOptions(
            temperature=1.0 if greedy else options.temperature,
            top_p=options.top_p,
            top_k=1 if greedy else 0,
            max_new_tokens=options.max_tokens,
            num_generations=options.num_samples,
        )
        texts: list[list[str | None]] = []
        for start in range(0, len(conversations), options.batch_size):
            batch = conversations[start : start + options.batch_size]
            rendered = tokenizer.apply_chat_template(batch, tokenize=False, add_generation_prompt=True)
            prompts = [list(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in rendered]
            started = time.perf_counter()
            completions = rollouts.generate(prompts, sampling, seeds[start : start + len(batch)])
            self._counts["seconds"] += time.perf_counter() - started
            self._counts["requests"] += len(batch)
            self._counts["prompt_tokens"] += sum(len(ids) for ids in prompts)
            self._counts["completion_tokens"] += sum(len(c.completion_ids) for c in completions)
            n = options.num_samples
            texts += [[c.text for c in completions[i * n : (i + 1) * n]] for i in range(len(batch))]
        return texts

    def usage(self) -> dict[str, float]:
        """Additive counters of this teacher's life: requests (an endpoint's attempts, retries included; a
        local teacher's problems generated for), retries, failures, malformed replies, prompt and completion
        tokens, and seconds (summed request latency; a local teacher's generation time)."""
        if self._client is None:
            return dict(self._counts)
        stats = self._client.stats
        return {
            "requests": float(stats.requests),
            "retries": float(stats.retries),
            "failures": float(stats.failures),
            "malformed": float(stats.malformed),
            "prompt_tokens": float(stats.prompt_tokens),
            "completion_tokens": float(stats.completion_tokens),
            "seconds": float(stats.latency_seconds),
        }

    def close(self) -> None:
        """Close the endpoint client's connections, or let the local model go."""
        if self._client is not None:
            self._client.close()
        self._local = None


__all__ = [
    "DEFAULT_TEACHER_SYSTEM_PROMPT",
    "Teacher",
    "TeacherOptions",
    "conversation",
    "problem_seed",
    "student_turns",
]
