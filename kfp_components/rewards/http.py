"""A reward endpoint over HTTP: POST the samples as JSON, read one score per sample back.

Request (one per batch of ``batch_size`` samples)::

    POST <url>   Content-Type: application/json   [Authorization: Bearer <token>]
    {"prompts": [...], "completions": [...], "<column>": [...], ...}

Answer: ``{"rewards": [number | null, ...]}``, one per completion of the request, in order.

Up to ``max_concurrency`` requests are in flight at once (threads). A request that fails with a 5xx or 429
answer, a refused or dropped connection or a timeout (``timeout_seconds``, per request: the socket timeout of
connecting and of each read) is tried again up to ``retries`` times, waiting ``backoff_seconds`` and then twice
as long each time; any other answer (4xx, a body that is not JSON, the wrong number of rewards) fails at once.
A failure is a :class:`~kfp_components.rewards.errors.RewardError` naming the endpoint (credentials redacted)
and the first sample of the failed request.

The bearer token is read from the environment variable named by ``token_env`` when the reward is loaded; it
is sent only in the ``Authorization`` header and never appears in logs or errors
(:func:`kfp_components.redaction.redact_text`, plus the token's own value). Standard library only.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http.client import HTTPException
from typing import Any, Literal
from urllib.parse import urlsplit

from kfp_components.redaction import MASK, redact_text
from kfp_components.rewards.errors import RewardError
from kfp_components.secret_refs import token_secret_problems
from kfp_components.typed_config import ConfigError, Options

log = logging.getLogger(__name__)

#: How much of an error answer's body an error message quotes.
BODY_EXCERPT_CHARS = 300


@dataclass
class HttpRewardOptions(Options):
    """Options of the shipped ``http`` reward.

    Attributes:
        function: ``http``.
        url: Endpoint receiving the POST (``http://`` or ``https://``), without credentials.
        name: Name in metrics; default ``http``.
        batch_size: Samples per request.
        max_concurrency: Requests in flight at once.
        timeout_seconds: Timeout of one request (connecting and each read).
        retries: Further attempts of a request after a 5xx or 429 answer, a connection error or a timeout.
        backoff_seconds: Wait before the first retry; it doubles each retry.
        token_env: Environment variable holding a bearer token (set it from a secret); empty: none.
        token_secret: On a cluster, the Kubernetes Secret holding the token, as <secret> or <secret>/<key>
            (key default: token_env's name): the TrainJob's workers get it as token_env. Needs token_env.
    """

    url: str
    function: Literal["http"] = "http"
    name: str = ""
    batch_size: int = 64
    max_concurrency: int = 4
    timeout_seconds: float = 60.0
    retries: int = 3
    backoff_seconds: float = 1.0
    token_env: str = ""
    token_secret: str = ""

    def validate(self) -> None:
        parts = urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ConfigError("url", f"expected an http:// or https:// URL, got {redact_text(self.url)!r}")
        if "@" in parts.netloc:
            raise ConfigError("url", "the URL carries credentials; give a token through token_env instead")
        problems = []
        if self.batch_size < 1:
            problems.append(("batch_size", f"must be at least 1, got {self.batch_size}"))
        if self.max_concurrency < 1:
            problems.append(("max_concurrency", f"must be at least 1, got {self.max_concurrency}"))
        if not self.timeout_seconds > 0 or math.isinf(self.timeout_seconds):
            problems.append(("timeout_seconds", f"must be a positive number, got {self.timeout_seconds}"))
        if self.retries < 0:
            problems.append(("retries", f"must not be negative, got {self.retries}"))
        if self.backoff_seconds < 0:
            problems.append(("backoff_seconds", f"must not be negative, got {self.backoff_seconds}"))
        problems += token_secret_problems(self.token_env, self.token_secret)
        if problems:
            raise ConfigError.of(problems)


class _Retryable(Exception):
    """A failure worth another attempt."""


class _Fatal(Exception):
    """A failure another attempt would not mend."""


class HttpReward:
    """Scores through an HTTP endpoint (see the module docstring)."""

    def __init__(self, options: HttpRewardOptions, environ: dict[str, str] | None = None):
        self.options = options
        environ = dict(os.environ) if environ is None else environ
        self._token = ""
        if options.token_env:
            self._token = environ.get(options.token_env, "")
            if not self._token:
                raise ValueError(f"token_env names {options.token_env}, which is not set or empty")
        self.where = redact_text(options.url)

    def __repr__(self) -> str:
        return f"HttpReward(url={self.where!r})"

    def __call__(
        self, prompts: Sequence[Any], completions: Sequence[str], **columns: Any
    ) -> list[float | None]:
        size = self.options.batch_size
        starts = list(range(0, len(completions), size))
        bodies = [self._body(prompts, completions, columns, start, start + size) for start in starts]
        with ThreadPoolExecutor(max_workers=min(self.options.max_concurrency, max(len(starts), 1))) as pool:
            futures = [
                pool.submit(self._post, body, start, min(size, len(completions) - start), prompts[start])
                for start, body in zip(starts, bodies, strict=True)
            ]
            try:
                results = [future.result() for future in futures]
            except BaseException:
                for future in futures:
                    future.cancel()
                raise
        return [score for batch in results for score in batch]

    def _body(
        self,
        prompts: Sequence[Any],
        completions: Sequence[str],
        columns: dict[str, Any],
        start: int,
        end: int,
    ) -> bytes:
        payload = {"prompts": list(prompts[start:end]), "completions": list(completions[start:end])}
        for name, values in columns.items():
            if name in payload:
                raise RewardError(self.where, f"a column is named {name!r}, which the request uses itself")
            payload[name] = list(values[start:end])
        try:
            return json.dumps(payload).encode("utf-8")
        except (TypeError, ValueError) as exc:
            raise RewardError(self.where, f"the samples cannot be sent as JSON: {exc}", index=start) from None

    def _post(self, body: bytes, start: int, count: int, prompt: Any) -> list[float | None]:
        attempts = self.options.retries + 1
        delay = self.options.backoff_seconds
        for attempt in range(1, attempts + 1):
            try:
                return self._attempt(body, count)
            except _Retryable as exc:
                reason = self._redact(str(exc))
                if attempt == attempts:
                    raise RewardError(
                        self.where,
                        f"the endpoint failed {attempts} time(s); last: {reason}",
                        index=start,
                        prompt=prompt,
                    ) from None
                log.warning(
                    "reward endpoint %s: %s; retry %d of %d in %.1f s",
                    self.where,
                    reason,
                    attempt,
                    attempts - 1,
                    delay,
                )
                time.sleep(delay)
                delay *= 2
            except _Fatal as exc:
                raise RewardError(self.where, self._redact(str(exc)), index=start, prompt=prompt) from None
        raise AssertionError("unreachable")

    def _attempt(self, body: bytes, count: int) -> list[float | None]:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        request = urllib.request.Request(self.options.url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.options.timeout_seconds) as response:
                raw = response.read()
        except urllib.error.HTTPError as exc:
            excerpt = _excerpt(exc.read())
            if exc.code >= 500 or exc.code == 429:
                raise _Retryable(f"HTTP {exc.code}: {excerpt}") from None
            raise _Fatal(f"the endpoint answered HTTP {exc.code}: {excerpt}") from None
        except TimeoutError:
            raise _Retryable(f"no answer within timeout_seconds={self.options.timeout_seconds:g}") from None
        except urllib.error.URLError as exc:
            if isinstance(exc.reason, TimeoutError):
                raise _Retryable(
                    f"no answer within timeout_seconds={self.options.timeout_seconds:g}"
                ) from None
            raise _Retryable(f"cannot connect: {exc.reason}") from None
        except (ConnectionError, HTTPException) as exc:
            raise _Retryable(f"connection failed: {type(exc).__name__}: {exc}") from None
        return _rewards_of(raw, count)

    def _redact(self, text: str) -> str:
        if self._token:
            text = text.replace(self._token, MASK)
        return redact_text(text)


def _rewards_of(raw: bytes, count: int) -> list[float | None]:
    try:
        answer = json.loads(raw)
    except ValueError:
        raise _Fatal(f"the answer is not JSON: {_excerpt(raw)}") from None
    rewards = answer.get("rewards") if isinstance(answer, dict) else None
    if not isinstance(rewards, list):
        raise _Fatal(f'expected {{"rewards": [...]}}, got {_excerpt(raw)}')
    if len(rewards) != count:
        raise _Fatal(f"the answer has {len(rewards)} rewards for {count} completions")
    return rewards


def _excerpt(raw: bytes) -> str:
    text = raw.decode("utf-8", errors="replace").strip()
    return text if len(text) <= BODY_EXCERPT_CHARS else text[: BODY_EXCERPT_CHARS - 3] + "..."


__all__ = ["HttpReward", "HttpRewardOptions"]
