"""Judges: an LLM that scores a response (pointwise) or says which of two responses is better (pairwise).

The judge model is reached through the backend of :class:`JudgeOptions`: ``openai`` (any OpenAI-compatible
endpoint: vLLM, KServe, TGI, a hosted API; :mod:`kfp_components.feedback.endpoint`) or ``local`` (a Hugging
Face causal LM on the trainer's device; :mod:`kfp_components.feedback.local`). Judging never samples: the
endpoint is asked at temperature 0 and the local model decodes greedily or reads its next-token probabilities.

**Pointwise** (:class:`PointwiseJudge`): ``prompt_template`` rendered with ``{prompt}``, ``{response}`` (and
any column of the row) is sent as the user message (after ``system_prompt``, when given). ``score_method``:

* ``parse``: the reply's first match of ``score_pattern`` (its first group when it has one; default: the
  first number) is the score. A reply without a match, or with a number outside ``[score_min, score_max]``,
  scores None: counted (``unscored``, ``out_of_scale``), left out of the reward's statistics and baselines,
  never a silent 0.
* ``expectation`` (local only): no decoding; the score is the expectation of the integers ``score_min`` to
  ``score_max`` under the model's next-token probabilities of their tokens (renormalised over them), a
  smoother signal than a sampled digit. Every integer of the scale must be a single token.

**Pairwise** (:class:`PairwiseJudge`): ``pairwise_template`` with ``{prompt}``, ``{response_a}``,
``{response_b}``. Every pair is judged in both orders and the two verdicts averaged, so a judge's preference
for a position cancels (Lee et al. 2023, arXiv:2309.00267): the result is the probability that the first
response is the better one, 0.5 for a judge that always answers "A". An ``openai`` judge's verdict is the
first standalone ``answer_a``/``answer_b`` label of its reply (1 or 0; no label: None); a ``local`` judge's is
the soft preference ``p(A) / (p(A) + p(B))`` from the next-token probabilities of the two labels. A pair one of
whose orders has no verdict is None.

Calls are cached per rendered request within a run (a response judged twice is sent once), and counted:
``usage()`` gives requests, cache hits, unscored replies, latency and tokens.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from kfp_components.feedback.endpoint import ModelOptions
from kfp_components.feedback.templates import (
    DEFAULT_PAIRWISE_TEMPLATE,
    DEFAULT_POINTWISE_TEMPLATE,
    PAIRWISE_FIELDS,
    POINTWISE_FIELDS,
    check_template,
    conversation_text,
    render,
)
from kfp_components.typed_config import ConfigError

log = logging.getLogger(__name__)

#: The first number of a reply (an optional sign and decimals).
DEFAULT_SCORE_PATTERN = r"[-+]?\d+(?:\.\d+)?"
#: How much of a reply an error message quotes.
REPLY_EXCERPT_CHARS = 200

#: The endpoint client's counters a judge reports (additive, so they sum over ranks and runs).
ENDPOINT_COUNTERS = (
    "requests",
    "retries",
    "failures",
    "malformed",
    "prompt_tokens",
    "completion_tokens",
    "latency_seconds",
)


@dataclass
class JudgeOptions(ModelOptions):
    """A judge: which model, how it is reached, and how its replies are read.

    Attributes:
        backend: openai (an OpenAI-compatible endpoint at base_url) or local (a Hugging Face causal LM loaded
            on the trainer's device).
        model: openai: the served model's name (as /v1/models lists it); local: a folder or hub id.
        system_prompt: A system message sent before the template's text (empty: none).
        prompt_template: The pointwise request: {response} is required; {prompt}, {score_min}, {score_max}
            and any column of the prompt rows may be used.
        pairwise_template: The pairwise request: {response_a} and {response_b} are required; {prompt} and any
            column may be used.
        score_method: parse (the first match of score_pattern in the reply) or expectation (local only: the
            expected score under the next-token probabilities of the scale's integers).
        score_pattern: Regular expression that finds the score in a reply (its first group, if it has one).
        score_min: Lowest score of the scale; a parsed score below it is no score.
        score_max: Highest score of the scale; a parsed score above it is no score.
        answer_a: The label of the first response in pairwise_template, as the judge should answer it.
        answer_b: The label of the second response.
        max_tokens: Most tokens of a reply (parse, and the openai pairwise verdict).
        batch_size: local: requests per forward pass.
        device: local: the judge's device (cpu, cuda:0); empty: the trainer's.
        dtype: local: the weights' dtype (float32, bfloat16, float16, auto).
    """

    system_prompt: str = ""
    prompt_template: str = DEFAULT_POINTWISE_TEMPLATE
    pairwise_template: str = DEFAULT_PAIRWISE_TEMPLATE
    score_method: Literal["parse", "expectation"] = "parse"
    score_pattern: str = DEFAULT_SCORE_PATTERN
    score_min: float = 1.0
    score_max: float = 10.0
    answer_a: str = "A"
    answer_b: str = "B"
    max_tokens: int = 16

    def validate(self) -> None:
        problems = self.model_problems()
        for key, required in (("prompt_template", ("response",)), ("pairwise_template", PAIRWISE_FIELDS[1:])):
            try:
                check_template(getattr(self, key), key, required)
            except ConfigError as exc:
                problems += exc.problems
        try:
            pattern = re.compile(self.score_pattern)
        except re.error as exc:
            problems.append(("score_pattern", f"is not a regular expression: {exc}"))
        else:
            if pattern.groups > 1:
                problems.append(("score_pattern", "may have at most one group (the score)"))
        if not (math.isfinite(self.score_min) and math.isfinite(self.score_max)):
            problems.append(("score_max", "the scale's bounds must be finite"))
        elif self.score_max <= self.score_min:
            problems.append(
                ("score_max", f"must be above score_min ({self.score_min:g}), got {self.score_max:g}")
            )
        if self.score_method == "expectation":
            if self.backend != "local":
                problems.append(
                    ("score_method", "expectation reads the judge's token probabilities: backend local only")
                )
            if not (float(self.score_min).is_integer() and float(self.score_max).is_integer()):
                problems.append(("score_min", "expectation needs an integer scale (score_min, score_max)"))
        for key in ("answer_a", "answer_b"):
            label = getattr(self, key)
            if not label.strip() or label != label.strip():
                problems.append((key, f"a non-empty label without surrounding spaces, got {label!r}"))
        if self.answer_a == self.answer_b:
            problems.append(("answer_b", f"must differ from answer_a ({self.answer_a!r})"))
        if self.max_tokens < 1:
            problems.append(("max_tokens", f"must be at least 1, got {self.max_tokens}"))
        if problems:
            raise ConfigError.of(problems)


class JudgeBackend:
    """What a judge needs of a model: replies to conversations, and next-token probabilities of labels."""

    def replies(self, conversations: Sequence[list[dict[str, str]]], max_tokens: int) -> list[str | None]:
        raise NotImplementedError

    def label_probabilities(
        self, conversations: Sequence[list[dict[str, str]]], labels: Sequence[str]
    ) -> list[list[float]]:
        """Per conversation, the next-token probability of each label renormalised over the labels."""
        raise NotImplementedError(f"{type(self).__name__} does not give token probabilities")

    def check(self) -> None:
        """Raise when the model cannot be reached or loaded."""

    def usage(self) -> dict[str, float]:
        """Additive counters of the run so far (requests, tokens, seconds waited)."""
        return {}

    def close(self) -> None:
        """Give back what the backend holds (threads, the model)."""


class EndpointBackend(JudgeBackend):
    """The ``openai`` backend: :class:`~kfp_components.feedback.endpoint.OpenAIChatClient`."""

    def __init__(self, options: JudgeOptions, environ: Mapping[str, str] | None = None):
        from kfp_components.feedback.endpoint import OpenAIChatClient

        self.client = OpenAIChatClient(options, role="judge", environ=environ)

    def replies(self, conversations: Sequence[list[dict[str, str]]], max_tokens: int) -> list[str | None]:
        answers = self.client.complete(conversations, max_tokens=max_tokens, temperature=0.0)
        return [answer.texts[0] if answer.texts else None for answer in answers]

    def check(self) -> None:
        self.client.check()

    def usage(self) -> dict[str, float]:
        stats = self.client.stats
        return {name: float(getattr(stats, name)) for name in ENDPOINT_COUNTERS}

    def close(self) -> None:
        self.client.close()


def build_backend(options: JudgeOptions, *, device: str = "cpu") -> JudgeBackend:
    """The backend of ``options``: an endpoint client, or the local model loaded on ``device`` (the judge's own
    ``device`` option wins)."""
    if options.backend == "openai":
        return EndpointBackend(options)
    from kfp_components.feedback.local import LocalJudgeModel

    return LocalJudgeModel(
        options.model, device=options.device or device, dtype=options.dtype, batch_size=options.batch_size
    )


@dataclass
class JudgeCounts:
    """What a judge did in a run (thread-safe increments through :meth:`add`)."""

    judged: int = 0  # samples (pointwise) or pairs in one order (pairwise) asked for
    cache_hits: int = 0
    unscored: int = 0  # results without a score or a verdict (cache hits included)
    out_of_scale: int = 0  # parsed scores outside [score_min, score_max]
    last_unscored_reply: str = ""
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, **counts: int) -> None:
        with self._lock:
            for key, value in counts.items():
                setattr(self, key, getattr(self, key) + value)


class _Judge:
    """What both judges share: the backend, the cache, the counts."""

    def __init__(self, options: JudgeOptions, backend: JudgeBackend):
        self.options = options
        self.backend = backend
        self.counts = JudgeCounts()
        self._cache: dict[str, float | None] = {}

    def conversation(self, text: str) -> list[dict[str, str]]:
        messages = (
            [{"role": "system", "content": self.options.system_prompt}] if self.options.system_prompt else []
        )
        return [*messages, {"role": "user", "content": text}]

    def cached(
        self,
        requests: list[list[dict[str, str]]],
        ask: Callable[[list[list[dict[str, str]]]], list[float | None]],
    ) -> list[float | None]:
        """``ask`` for the requests not answered yet in this run (by the SHA-256 of the rendered request);
        the rest from the cache. A request without an answer (None) is not cached: it is asked again."""
        keys = [
            hashlib.sha256(json.dumps(request, sort_keys=True, ensure_ascii=False).encode()).hexdigest()
            for request in requests
        ]
        new: dict[str, list[dict[str, str]]] = {}
        for key, request in zip(keys, requests, strict=True):
            if key not in self._cache and key not in new:
                new[key] = request
        answers = dict(zip(new, ask(list(new.values())), strict=True)) if new else {}
        self._cache.update((key, value) for key, value in answers.items() if value is not None)
        results = [answers[key] if key in answers else self._cache[key] for key in keys]
        self.counts.add(
            judged=len(requests),
            cache_hits=len(requests) - len(new),
            unscored=sum(value is None for value in results),
        )
        return results

    def unscored(self, reply: str | None) -> None:
        """Remember a reply without a score (counted per result by :meth:`cached`)."""
        self.counts.last_unscored_reply = _excerpt(reply)

    def usage(self) -> dict[str, float]:
        """Additive counts of the run so far: ``judged``, ``cache_hits``, ``unscored``, ``out_of_scale`` and
        the backend's (an endpoint's requests, retries, failures, malformed replies, tokens and seconds)."""
        counts = self.counts
        return {
            "judged": float(counts.judged),
            "cache_hits": float(counts.cache_hits),
            "unscored": float(counts.unscored),
            "out_of_scale": float(counts.out_of_scale),
            **self.backend.usage(),
        }

    def check(self) -> None:
        self.backend.check()

    def close(self) -> None:
        self.backend.close()


class PointwiseJudge(_Judge):
    """Scores each response on the scale (see the module docstring)."""

    def __init__(self, options: JudgeOptions, backend: JudgeBackend):
        super().__init__(options, backend)
        self.pattern = re.compile(options.score_pattern)
        self.scale = (
            [str(value) for value in range(int(options.score_min), int(options.score_max) + 1)]
            if options.score_method == "expectation"
            else []
        )

    def request(self, prompt: Any, response: str, columns: Mapping[str, Any]) -> list[dict[str, str]]:
        """The conversation sent for one sample."""
        options = self.options
        values = {
            "prompt": conversation_text(prompt),
            "response": response,
            "score_min": f"{options.score_min:g}",
            "score_max": f"{options.score_max:g}",
        }
        return self.conversation(render(options.prompt_template, "prompt_template", values, columns))

    def score(
        self, prompts: Sequence[Any], responses: Sequence[str], columns: Mapping[str, Sequence[Any]]
    ) -> list[float | None]:
        """One score (or None) per response; ``columns`` aligned with ``prompts``."""
        requests = [
            self.request(prompt, response, {name: values[i] for name, values in columns.items()})
            for i, (prompt, response) in enumerate(zip(prompts, responses, strict=True))
        ]
        return self.cached(requests, self._ask)

    def _ask(self, requests: list[list[dict[str, str]]]) -> list[float | None]:
        if self.options.score_method == "expectation":
            probabilities = self.backend.label_probabilities(requests, self.scale)
            return [sum(p * float(v) for p, v in zip(row, self.scale, strict=True)) for row in probabilities]
        return [self.parse(reply) for reply in self.backend.replies(requests, self.options.max_tokens)]

    def parse(self, reply: str | None) -> float | None:
        """The score in ``reply``, or None (counted) when it has none on the scale."""
        match = self.pattern.search(reply or "")
        if match is None:
            self.unscored(reply)
            return None
        try:
            value = float(match.group(1) if self.pattern.groups else match.group(0))
        except (TypeError, ValueError):  # an optional group that matched nothing, or not a number
            self.unscored(reply)
            return None
        if not self.options.score_min <= value <= self.options.score_max:
            self.counts.add(out_of_scale=1)
            self.unscored(reply)
            return None
        return value


class PairwiseJudge(_Judge):
    """Says which of two responses is better, averaged over both orders (see the module docstring)."""

    def __init__(self, options: JudgeOptions, backend: JudgeBackend):
        super().__init__(options, backend)
        labels = "|".join(re.escape(label) for label in (options.answer_a, options.answer_b))
        self.verdict = re.compile(rf"(?<!\w)({labels})(?!\w)")
        self.soft = options.backend == "local"

    def request(
        self, prompt: Any, first: str, second: str, columns: Mapping[str, Any]
    ) -> list[dict[str, str]]:
        values = {"prompt": conversation_text(prompt), "response_a": first, "response_b": second}
        return self.conversation(render(self.options.pairwise_template, "pairwise_template", values, columns))

    def prefer(
        self,
        prompts: Sequence[Any],
        responses_a: Sequence[str],
        responses_b: Sequence[str],
        columns: Mapping[str, Sequence[Any]] | None = None,
    ) -> list[float | None]:
        """Per pair, the probability that ``responses_a[i]`` is better than ``responses_b[i]``: the mean of
        the verdicts with a shown first and with b shown first; None when either order has no verdict."""
        columns = columns or {}
        rows = [{name: values[i] for name, values in columns.items()} for i in range(len(prompts))]
        forward = [
            self.request(p, a, b, row)
            for p, a, b, row in zip(prompts, responses_a, responses_b, rows, strict=True)
        ]
        backward = [
            self.request(p, b, a, row)
            for p, a, b, row in zip(prompts, responses_a, responses_b, rows, strict=True)
        ]
        verdicts = self.cached(forward + backward, self._ask)
        first, second = verdicts[: len(forward)], verdicts[len(forward) :]
        return [
            None if x is None or y is None else (x + (1.0 - y)) / 2.0
            for x, y in zip(first, second, strict=True)
        ]

    def _ask(self, requests: list[list[dict[str, str]]]) -> list[float | None]:
        """P(the first response is better) per request."""
        if self.soft:
            labels = [self.options.answer_a, self.options.answer_b]
            return [row[0] for row in self.backend.label_probabilities(requests, labels)]
        return [self.parse(reply) for reply in self.backend.replies(requests, self.options.max_tokens)]

    def parse(self, reply: str | None) -> float | None:
        """1.0 when the reply's first label is answer_a, 0.0 for answer_b, None (counted) for neither."""
        match = self.verdict.search(reply or "")
        if match is None:
            self.unscored(reply)
            return None
        return 1.0 if match.group(1) == self.options.answer_a else 0.0


def _excerpt(reply: str | None) -> str:
    if reply is None:
        return "(no text)"
    text = reply.strip()
    return text if len(text) <= REPLY_EXCERPT_CHARS else text[: REPLY_EXCERPT_CHARS - 3] + "..."


__all__ = [
    "DEFAULT_PAIRWISE_TEMPLATE",
    "DEFAULT_POINTWISE_TEMPLATE",
    "POINTWISE_FIELDS",
    "JudgeBackend",
    "JudgeOptions",
    "PairwiseJudge",
    "PointwiseJudge",
    "build_backend",
]
