"""An LLM served behind an OpenAI-compatible API (vLLM, KServe, TGI, a hosted API), called through the official
``openai`` client: the backend that judges (RLAIF) and teachers (distillation) share.

:class:`EndpointOptions` says where and how to call it; its fields sit flat in the options of whatever uses it
(``judge: {backend: openai, base_url: ..., model: ..., token_env: ...}``), which call
:meth:`EndpointOptions.endpoint_problems` when their backend is ``openai``.

:class:`OpenAIChatClient` sends one ``chat.completions.create`` per conversation, up to ``max_concurrency`` in
flight at once (threads), and gives the replies back in order:

* The client is built with ``max_retries=0`` and ``timeout=timeout_seconds``; the retries are ours, so each one
  is counted (:class:`EndpointStats`), logged (one warning, redacted) and bounded by the run's request budget.
  A 429, a 5xx, a connection error or a timeout is tried again up to ``retries`` times, waiting
  ``backoff_seconds`` and then twice as long each time; a ``Retry-After`` (or ``retry-after-ms``) header is
  honoured instead, up to :data:`MAX_RETRY_AFTER_SECONDS`. Any other 4xx fails at once.
* ``max_requests`` bounds the chat-completion attempts of the client's life (retries included); the attempt
  beyond it is a :class:`FeedbackError` and is never sent. :meth:`OpenAIChatClient.check` does not count.
* A 200 whose body is not a chat completion (not JSON, no choices, a choice without text, log-probs asked and
  missing) is not retried and not an error: the choices it lacks are ``None`` and ``stats.malformed`` counts it.
  The reply is read from the response's own bytes, so a broken body is recognised rather than half-built.
* The first :class:`FeedbackError` of a batch stops it: requests not yet sent are cancelled, those in flight end
  (no further retries) and the error is raised.

The key is read from the environment variable named by ``token_env`` when the client is built and is sent only
as the bearer token. Errors and log lines go through :func:`kfp_components.redaction.redact_text` with the key's
own value masked as well. ``openai`` is imported only when a client is built, so this module imports on the
base install.
"""

from __future__ import annotations

import email.utils
import json
import logging
import math
import os
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, TypeVar
from urllib.parse import urlsplit

from kfp_components.redaction import MASK, redact_text
from kfp_components.secret_refs import token_secret_problems
from kfp_components.typed_config import ConfigError, Options

if TYPE_CHECKING:
    import openai

log = logging.getLogger(__name__)

#: How much of a response body an error message quotes.
BODY_EXCERPT_CHARS = 300
#: The longest wait a ``Retry-After`` header can ask for.
MAX_RETRY_AFTER_SECONDS = 60.0
#: The most top log-probs a request may ask for (OpenAI's and vLLM's default limit).
MAX_TOP_LOGPROBS = 20
#: The key sent when ``token_env`` is empty: vLLM without ``--api-key`` accepts any key (its docs use EMPTY).
PLACEHOLDER_KEY = "EMPTY"
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

T = TypeVar("T")


@dataclass
class EndpointOptions(Options):
    """Where and how to call an LLM served behind an OpenAI-compatible API (vLLM, KServe, TGI, a hosted API).

    A mixin: the options of a judge or a teacher subclass it, so these fields appear flat in their YAML.
    Nothing here is checked on construction (a local backend leaves ``base_url`` empty); the subclass calls
    :meth:`endpoint_problems` when its backend is ``openai``.

    Attributes:
        base_url: ``http(s)://host:port/v1``, without credentials.
        model: The served model name (what ``/v1/models`` lists).
        token_env: Environment variable holding the API key (set it from a Kubernetes secret); empty: no key
            (a placeholder is sent, as vLLM without ``--api-key`` expects).
        token_secret: On a cluster, the Kubernetes Secret holding the key, as <secret> or <secret>/<key> (key
            default: token_env's name): the TrainJob's workers get it as token_env. Needs token_env.
        max_concurrency: Requests in flight at once (threads).
        timeout_seconds: Timeout of one request (connecting, sending and each read).
        retries: Further attempts after a 429 or 5xx answer, a connection error or a timeout.
        backoff_seconds: Wait before the first retry; it doubles each retry. A ``Retry-After`` header, when
            sent, is honoured instead (up to 60 s).
        max_requests: The request budget of the run: chat-completion attempts, retries included; 0: no limit.
    """

    base_url: str = ""
    model: str = ""
    token_env: str = ""
    token_secret: str = ""
    max_concurrency: int = 8
    timeout_seconds: float = 60.0
    retries: int = 3
    backoff_seconds: float = 1.0
    max_requests: int = 0

    def endpoint_problems(self, prefix: str = "") -> list[tuple[str, str]]:
        """Every problem of the endpoint options as ``(key path, message)``, key paths under ``prefix``."""
        problems: list[tuple[str, str]] = []
        parts = urlsplit(self.base_url)
        if not self.base_url:
            problems.append(("base_url", "required: the endpoint's http(s)://host:port/v1"))
        elif parts.scheme not in ("http", "https") or not parts.netloc:
            problems.append(
                ("base_url", f"expected an http:// or https:// URL, got {redact_text(self.base_url)!r}")
            )
        elif "@" in parts.netloc:
            problems.append(
                ("base_url", "the URL carries credentials; give the key through token_env instead")
            )
        if not self.model:
            problems.append(("model", "required: the served model name (what /v1/models lists)"))
        if self.token_env and not _ENV_NAME.match(self.token_env):
            problems.append(("token_env", f"expected an environment variable name, got {self.token_env!r}"))
        problems += token_secret_problems(self.token_env, self.token_secret)
        if self.max_concurrency < 1:
            problems.append(("max_concurrency", f"must be at least 1, got {self.max_concurrency}"))
        if not self.timeout_seconds > 0 or math.isinf(self.timeout_seconds):
            problems.append(("timeout_seconds", f"must be a positive number, got {self.timeout_seconds}"))
        if self.retries < 0:
            problems.append(("retries", f"must not be negative, got {self.retries}"))
        if not self.backoff_seconds >= 0 or math.isinf(self.backoff_seconds):
            problems.append(("backoff_seconds", f"must be a non-negative number, got {self.backoff_seconds}"))
        if self.max_requests < 0:
            problems.append(("max_requests", f"must not be negative (0: no limit), got {self.max_requests}"))
        return [(f"{prefix}.{path}" if prefix else path, message) for path, message in problems]


@dataclass
class ModelOptions(EndpointOptions):
    """An LLM that judges or teaches: behind an OpenAI-compatible endpoint, or loaded locally.

    Attributes:
        backend: openai (an OpenAI-compatible endpoint at base_url) or local (a Hugging Face causal LM).
        model: openai: the served model's name (as /v1/models lists it); local: a folder or hub id.
        batch_size: local: requests per forward pass or generate call.
        device: local: the model's device (cpu, cuda:0); empty: the caller's.
        dtype: local: the weights' dtype (float32, bfloat16, float16, auto).
    """

    backend: Literal["openai", "local"] = "openai"
    batch_size: int = 8
    device: str = ""
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "float32"

    def model_problems(self) -> list[tuple[str, str]]:
        """The endpoint's problems (openai), or a local model's: a model reference and no base_url."""
        problems: list[tuple[str, str]] = []
        if self.backend == "openai":
            problems += self.endpoint_problems()
        else:
            if not self.model.strip():
                problems.append(("model", "required: the model's folder or hub id"))
            if self.base_url:
                problems.append(("base_url", "applies to backend openai; a local model is loaded from model"))
        if self.batch_size < 1:
            problems.append(("batch_size", f"must be at least 1, got {self.batch_size}"))
        return problems

    def describe(self) -> str:
        """Where the model is, for logs and plans (no credentials)."""
        if self.backend == "openai":
            return f"{self.model} at {redact_text(self.base_url)}"
        return f"{self.model} (local)"


@dataclass
class ChatReply:
    """The answer to one conversation.

    Attributes:
        texts: One per choice (``n``); None where the choice had no text (a malformed reply).
        prompt_tokens: Prompt tokens, as the endpoint's ``usage`` counts them (0 when it sends none).
        completion_tokens: Completion tokens of all choices, as ``usage`` counts them.
        latency_seconds: Time of the successful attempt.
        first_token_logprobs: Per choice, the top log-probs of the first generated token (token -> log-prob)
            when they were asked for (``top_logprobs`` > 0), an empty mapping where a choice lacks them; else
            None.
    """

    texts: list[str | None]
    prompt_tokens: int
    completion_tokens: int
    latency_seconds: float
    first_token_logprobs: list[dict[str, float]] | None = None


@dataclass
class EndpointStats:
    """Counters of one client, safe to update from several threads.

    Attributes:
        requests: Chat-completion attempts sent (retries included): what ``max_requests`` bounds.
        retries: Attempts that repeated a failed one.
        failures: Attempts that failed (an error status, a connection error, a timeout), retried or not.
        malformed: Answers (200) whose body was not a complete chat completion.
        prompt_tokens: Prompt tokens of the answered attempts (the endpoint's ``usage``).
        completion_tokens: Completion tokens of the answered attempts.
        latency_seconds: Summed time of the answered attempts.
        max_latency_seconds: The longest answered attempt.
    """

    requests: int = 0
    retries: int = 0
    failures: int = 0
    malformed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_seconds: float = 0.0
    max_latency_seconds: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    @property
    def answered(self) -> int:
        """Attempts that got a 200 (``requests - failures``)."""
        return self.requests - self.failures

    def metrics(self, prefix: str) -> dict[str, float]:
        """Every counter as ``{prefix}/{name}``, plus ``{prefix}/mean_latency_seconds`` of the answered ones."""
        with self._lock:
            values: dict[str, float] = {
                "requests": self.requests,
                "retries": self.retries,
                "failures": self.failures,
                "malformed": self.malformed,
                "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens,
                "latency_seconds": self.latency_seconds,
                "max_latency_seconds": self.max_latency_seconds,
                "mean_latency_seconds": self.latency_seconds / self.answered if self.answered else 0.0,
            }
        return {f"{prefix}/{name}": float(value) for name, value in values.items()}

    def count_failure(self) -> None:
        with self._lock:
            self.failures += 1

    def count_retry(self) -> None:
        with self._lock:
            self.retries += 1

    def count_answer(self, reply: ChatReply, *, malformed: bool) -> None:
        with self._lock:
            self.malformed += int(malformed)
            self.prompt_tokens += reply.prompt_tokens
            self.completion_tokens += reply.completion_tokens
            self.latency_seconds += reply.latency_seconds
            self.max_latency_seconds = max(self.max_latency_seconds, reply.latency_seconds)

    def take_request(self, budget: int) -> bool:
        """Count one more attempt unless ``budget`` (> 0) attempts were made already; whether it may go."""
        with self._lock:
            if budget and self.requests >= budget:
                return False
            self.requests += 1
            return True


class FeedbackError(Exception):
    """A call to an LLM endpoint failed: names the endpoint (URL redacted), the model, what failed and an
    excerpt of the last response body (at most :data:`BODY_EXCERPT_CHARS` characters); never the key."""

    def __init__(
        self, endpoint: str, model: str, what: str, body: str | None = None, status: int | None = None
    ):
        self.endpoint = endpoint
        self.model = model
        self.what = what
        self.body = body
        self.status = status
        text = f"{endpoint} (model {model!r}): {what}"
        if body:
            text += f"; last response: {body}"
        super().__init__(text)


class _Retryable(Exception):
    def __init__(
        self, reason: str, body: str | None = None, status: int | None = None, wait: float | None = None
    ):
        super().__init__(reason)
        self.body, self.status, self.wait = body, status, wait


class _Fatal(Exception):
    def __init__(self, reason: str, body: str | None = None, status: int | None = None):
        super().__init__(reason)
        self.body, self.status = body, status


class _Cancelled(Exception):
    """Another request of the batch failed: this one stops without sending more."""


class OpenAIChatClient:
    """Chat completions from an OpenAI-compatible endpoint (see the module docstring).

    ``role`` names the use (``judge``, ``teacher``) in errors and log lines; ``environ`` (default: this
    process's environment) is where ``token_env`` is read.
    """

    def __init__(
        self, options: EndpointOptions, *, role: str = "judge", environ: Mapping[str, str] | None = None
    ):
        problems = options.endpoint_problems()
        if problems:
            raise ConfigError.of(problems)
        self.options = options
        self.role = role
        self.where = f"{role} endpoint {redact_text(options.base_url)}"
        self.stats = EndpointStats()
        environ = os.environ if environ is None else environ
        self._key = ""
        if options.token_env:
            self._key = environ.get(options.token_env, "")
            if not self._key:
                raise self._error(f"token_env names {options.token_env}, which is not set or empty")
        try:
            import openai
        except ImportError:
            raise ImportError(
                f"the {role}'s openai backend needs the openai package: pip install 'kfp-components[feedback]'"
            ) from None

        self._openai = openai
        self._client = openai.OpenAI(
            base_url=options.base_url,
            api_key=self._key or PLACEHOLDER_KEY,
            max_retries=0,
            timeout=options.timeout_seconds,
        )

    def __repr__(self) -> str:
        return f"OpenAIChatClient({self.where!r}, model={self.options.model!r})"

    def __enter__(self) -> OpenAIChatClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the client's connections."""
        self._client.close()

    def check(self) -> None:
        """``GET /v1/models``: raises :class:`FeedbackError` when the endpoint is unreachable, refuses the key,
        or does not list ``model`` (the error lists what it serves). Retried as a completion is; not counted
        against ``max_requests``."""
        page = self._with_retries(lambda: self._client.models.list(), threading.Event(), counted=False)
        served = [getattr(model, "id", "?") for model in page.data]
        if self.options.model not in served:
            listed = ", ".join(repr(name) for name in served) or "nothing"
            raise self._error(f"the model {self.options.model!r} is not served; the endpoint serves {listed}")

    def complete(
        self,
        conversations: Sequence[list[dict[str, Any]]],
        *,
        max_tokens: int,
        temperature: float = 0.0,
        n: int = 1,
        seed: int | Sequence[int] | None = None,
        top_logprobs: int = 0,
        top_p: float = 1.0,
    ) -> list[ChatReply]:
        """One chat completion per conversation (a list of ``{"role", "content"}`` messages), up to
        ``max_concurrency`` in flight; the replies in the order of ``conversations``. ``seed``: one for every
        request, or one per conversation. ``top_p`` is sent only when below 1."""
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {max_tokens}")
        if n < 1:
            raise ValueError(f"n must be at least 1, got {n}")
        if not 0 <= top_logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}, got {top_logprobs}")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        if not conversations:
            return []
        seeds = [seed] * len(conversations) if seed is None or isinstance(seed, int) else list(seed)
        if len(seeds) != len(conversations):
            raise ValueError(
                f"{len(seeds)} seeds for {len(conversations)} conversations; give one per conversation"
            )
        arguments: dict[str, Any] = {
            "model": self.options.model,
            "max_tokens": max_tokens,
            "temperature": temperature,
            "n": n,
        }
        if top_p < 1:
            arguments["top_p"] = top_p
        if top_logprobs:
            arguments["logprobs"] = True
            arguments["top_logprobs"] = top_logprobs
        cancelled = threading.Event()
        workers = min(self.options.max_concurrency, len(conversations))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"{self.role}-endpoint") as pool:
            futures = [
                pool.submit(
                    self._complete_one,
                    messages,
                    arguments if one_seed is None else {**arguments, "seed": one_seed},
                    top_logprobs,
                    cancelled,
                )
                for messages, one_seed in zip(conversations, seeds, strict=True)
            ]
            try:
                done, _ = wait(futures, return_when=FIRST_EXCEPTION)
                failed = _first_failure(futures, done)
                if failed is not None:
                    raise failed
            except BaseException:
                cancelled.set()
                for future in futures:
                    future.cancel()
                raise
        return [future.result() for future in futures]

    # one conversation

    def _complete_one(
        self,
        messages: list[dict[str, Any]],
        arguments: dict[str, Any],
        top_logprobs: int,
        cancelled: threading.Event,
    ) -> ChatReply:
        def attempt() -> ChatReply:
            started = time.perf_counter()
            raw = self._client.chat.completions.with_raw_response.create(
                messages=messages,  # type: ignore[arg-type]  # plain role/content dicts, as the API takes
                **arguments,
            )
            content = raw.http_response.content
            return _reply_of(content, arguments["n"], top_logprobs, time.perf_counter() - started)

        try:
            reply = self._with_retries(attempt, cancelled, counted=True)
        except FeedbackError:
            cancelled.set()  # at once, so that no worker sends another request of this batch
            raise
        malformed = any(text is None for text in reply.texts)
        self.stats.count_answer(reply, malformed=malformed)
        return reply

    def _with_retries(self, call: Callable[[], T], cancelled: threading.Event, *, counted: bool) -> T:
        attempts = self.options.retries + 1
        delay = self.options.backoff_seconds
        last: _Retryable | None = None
        for attempt in range(1, attempts + 1):
            if cancelled.is_set():
                raise _Cancelled()
            if counted:
                if not self.stats.take_request(self.options.max_requests):
                    raise self._budget_spent(last)
                if attempt > 1:
                    self.stats.count_retry()
            try:
                return self._attempt(call)
            except _Retryable as exc:
                last = exc
                if counted:
                    self.stats.count_failure()
                reason = self._redact(str(exc))
                if attempt == attempts:
                    raise self._error(
                        f"failed {attempts} time(s); last: {reason}", exc.body, exc.status
                    ) from None
                wait_seconds = delay if exc.wait is None else min(exc.wait, MAX_RETRY_AFTER_SECONDS)
                log.warning(
                    "%s (model %r): %s; retry %d of %d in %.2f s",
                    self.where,
                    self.options.model,
                    f"{reason}: {exc.body}" if exc.body else reason,
                    attempt,
                    attempts - 1,
                    wait_seconds,
                )
                if cancelled.wait(wait_seconds):
                    raise _Cancelled() from None
                delay *= 2
            except _Fatal as exc:
                if counted:
                    self.stats.count_failure()
                raise self._error(self._redact(str(exc)), exc.body, exc.status) from None
        raise AssertionError("unreachable")

    def _budget_spent(self, last: _Retryable | None) -> FeedbackError:
        what = (
            f"request budget spent: max_requests={self.options.max_requests} attempts were made "
            f"({self.stats.retries} of them retries); raise max_requests or send fewer requests"
        )
        if last is None:
            return self._error(what)
        return self._error(f"{what}; this request's last attempt: {last}", last.body, last.status)

    def _attempt(self, call: Callable[[], T]) -> T:
        openai = self._openai
        timeout = self.options.timeout_seconds
        try:
            return call()
        except openai.APITimeoutError:
            raise _Retryable(f"no answer within timeout_seconds={timeout:g}") from None
        except openai.APIConnectionError as exc:
            cause = exc.__cause__ or exc
            if isinstance(cause, TimeoutError) or "timed out" in str(cause).lower():
                raise _Retryable(f"no answer within timeout_seconds={timeout:g}") from None
            raise _Retryable(f"cannot connect: {type(cause).__name__}: {cause}") from None
        except openai.APIStatusError as exc:
            raise self._status_failure(exc) from None

    def _status_failure(self, exc: openai.APIStatusError) -> _Retryable | _Fatal:
        status = exc.status_code
        body = _excerpt(self._redact(exc.response.text))
        if status == 429 or status >= 500:
            return _Retryable(f"HTTP {status}", body, status, _retry_after(exc.response.headers))
        if status in (401, 403):
            hint = (
                f"check the key in ${self.options.token_env}"
                if self.options.token_env
                else "the endpoint wants a key: set token_env to the environment variable holding it"
            )
            return _Fatal(f"HTTP {status}: the key was refused; {hint}", body, status)
        return _Fatal(f"HTTP {status}", body, status)

    def _error(self, what: str, body: str | None = None, status: int | None = None) -> FeedbackError:
        return FeedbackError(self.where, self.options.model, self._redact(what), body, status)

    def _redact(self, text: str) -> str:
        if self._key and self._key != PLACEHOLDER_KEY:
            text = text.replace(self._key, MASK)
        return redact_text(text)


def optional_token_env(token_env: str, environ: Mapping[str, str] | None = None) -> str:
    """``token_env`` when it is set (not empty) in ``environ`` (default: this process's environment), else ``""``
    with a warning naming it: for a key that a step gets from an optional Kubernetes Secret, whose absence
    means a keyless endpoint (vLLM without ``--api-key``). An endpoint that wants a key then fails the first
    request with a 401 error, after the warning."""
    environ = os.environ if environ is None else environ
    if not token_env or environ.get(token_env):
        return token_env
    log.warning(
        "%s is not set (its optional Secret is absent): the endpoint is called without a key", token_env
    )
    return ""


def _first_failure(futures: list[Future[ChatReply]], done: set[Future[ChatReply]]) -> BaseException | None:
    """The first failure among ``done`` in submission order, a FeedbackError before a cancellation."""
    errors = [f.exception() for f in futures if f in done and not f.cancelled() and f.exception() is not None]
    real = [e for e in errors if not isinstance(e, _Cancelled)]
    return (real or errors or [None])[0]


def _reply_of(content: bytes, n: int, top_logprobs: int, latency: float) -> ChatReply:
    """A :class:`ChatReply` from a 200's body; what is missing or broken becomes None (see the module docstring)."""
    texts: list[str | None] = [None] * n
    logprobs: list[dict[str, float]] | None = [{} for _ in range(n)] if top_logprobs else None
    try:
        data = json.loads(content)
    except ValueError:
        data = None
    if not isinstance(data, dict):
        return ChatReply(texts, 0, 0, latency, logprobs)
    usage = data.get("usage")
    if not isinstance(usage, dict):
        usage = {}
    reply = ChatReply(
        texts, _count(usage.get("prompt_tokens")), _count(usage.get("completion_tokens")), latency, logprobs
    )
    choices = data.get("choices")
    if not isinstance(choices, list):
        return reply
    for position, choice in enumerate(choices):
        if not isinstance(choice, dict):
            continue
        index = choice.get("index", position)
        if not isinstance(index, int) or not 0 <= index < n:
            continue
        message = choice.get("message")
        text = message.get("content") if isinstance(message, dict) else None
        if not isinstance(text, str):
            continue
        if logprobs is not None:
            top = _first_token_top_logprobs(choice.get("logprobs"))
            if top is None:
                continue  # asked for and missing: the choice is incomplete
            logprobs[index] = top
        texts[index] = text
    return reply


def _first_token_top_logprobs(value: Any) -> dict[str, float] | None:
    content = value.get("content") if isinstance(value, dict) else None
    if not isinstance(content, list) or not content or not isinstance(content[0], dict):
        return None
    top = content[0].get("top_logprobs")
    if not isinstance(top, list):
        return None
    result = {}
    for entry in top:
        if not isinstance(entry, dict):
            return None
        token, logprob = entry.get("token"), entry.get("logprob")
        if not isinstance(token, str) or not isinstance(logprob, int | float):
            return None
        result[token] = float(logprob)
    return result


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def _retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds a ``retry-after-ms`` or ``Retry-After`` (seconds or an HTTP date) header asks to wait."""
    milliseconds = headers.get("retry-after-ms")
    if milliseconds:
        try:
            return max(float(milliseconds) / 1000, 0.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(when.timestamp() - time.time(), 0.0)


def _excerpt(text: str) -> str:
    text = text.strip()
    return text if len(text) <= BODY_EXCERPT_CHARS else text[: BODY_EXCERPT_CHARS - 3] + "..."


__all__ = [
    "ChatReply",
    "EndpointOptions",
    "EndpointStats",
    "FeedbackError",
    "OpenAIChatClient",
    "optional_token_env",
]
