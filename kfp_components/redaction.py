"""What may be written down: texts and records without credentials.

Everything the package records (``pipeline_config.json``, ``pipeline_state.json``, log lines, error messages,
a Model artifact's metadata) goes through here first:

* :func:`redact_uris` replaces the credentials of every URI in a text: the user info
  (``https://user:pass@host`` -> ``https://***@host``) and the values of secret-looking query and fragment
  keys (``X-Amz-Signature``, ``X-Amz-Credential``, ``sig``, ``token``, ``access_token``, ``api_key``, ...);
  everything else stays as it was, so a record still says where the data came from.
* :func:`redact_text` does that, replaces the values of secret environment variables (``HF_TOKEN``,
  ``AWS_SECRET_ACCESS_KEY``, ``*_PASSWORD``, ``*_API_KEY``, ...) wherever they appear, values shaped like
  credentials (private keys, ``Bearer ...`` headers, JWTs such as service-account tokens, Hugging Face, AWS,
  GitHub, OpenAI-style and Slack tokens) and secret assignments (``HF_TOKEN=...``, ``--api_key=...``).
* :func:`redact_record` applies :func:`redact_text` to every string of plain data (mappings, lists) and
  replaces the values of secret-looking keys (``api_key``, ``password``, ``hf_token``, ``WANDB_API_KEY``,
  ...), including the ``value`` beside a secret ``name`` in a Kubernetes-style env list.

Standard library only: the logging set-up of every process (the trainer's included) uses it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

MASK = "***"

#: Query (or fragment) keys whose values are credentials: signed links (S3 ``X-Amz-Signature``,
#: ``X-Amz-Credential``, ``X-Amz-Security-Token``; Azure SAS ``sig``; GCS ``Signature``) and tokens or keys.
SECRET_QUERY_KEYS = re.compile(r"token|sig|signature|secret|password|key|credential|auth", re.IGNORECASE)
#: Mapping keys whose values are credentials (``api_key``, ``password``, ``hf_token``, ``aws_secret_access_key``).
SECRET_KEYS = re.compile(
    r"(^|[_\-.])(token|secret|password|passwd|passphrase|api[_-]?key|credentials?|authorization|"
    r"access[_-]?key(_id)?|secret[_-]?key|private[_-]?key)$",
    re.IGNORECASE,
)
#: Keys that end like a secret but name a tokenizer's special token (``pad_token``, ``eos_token``, ...).
_TOKENIZER_TOKENS = re.compile(r"(^|[_\-.])(pad|eos|bos|unk|sep|cls|mask|special)[_-]?token$", re.IGNORECASE)
#: Environment variables whose values are credentials; a ``*_FILE``, ``*_PATH`` or ``*_DIR`` names a place.
_SECRET_ENV = re.compile(
    r"(^|_)(TOKEN|SECRET|PASSWORD|PASSWD|KEY|API_?KEY|ACCESS_KEY|SECRET_KEY|PRIVATE_KEY|CREDENTIALS?)(_|$)",
    re.IGNORECASE,
)
_PLACE_ENV = re.compile(r"_(FILE|PATH|DIR|ENV|URL|ENDPOINT)$", re.IGNORECASE)
#: Shorter values are not treated as secrets (a flag like ``1`` or ``true`` must not vanish from every log).
MIN_SECRET_LENGTH = 8

#: Values shaped like credentials, wherever they appear.
_SECRET_VALUE = re.compile(
    r"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?(?:-----END [A-Z ]*PRIVATE KEY-----|\Z)"
    r"|\b[Bb]earer\s+[A-Za-z0-9._~+/=-]{8,}"
    r"|\beyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}"
    r"|\bhf_[A-Za-z0-9]{30,}"
    r"|\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"
    r"|\b(?:gh[pousr]_[A-Za-z0-9]{30,}|github_pat_[A-Za-z0-9_]{30,})"
    r"|\bsk-[A-Za-z0-9_-]{20,}"
    r"|\bxox[abprs]-[A-Za-z0-9-]{10,}",
    re.DOTALL,
)
#: ``NAME=value`` (an env assignment, a ``--name=value`` flag) at the start of a string or after a space.
_ASSIGNMENT = re.compile(r"(?:^|(?<=[\s,;]))(--?)?([A-Za-z_][A-Za-z0-9_.-]*)=([^\s,;]+)")

# ``scheme://userinfo@``: user info has no '/', '?', '#' or '@' (RFC 3986); hf:// uses '@' for a revision.
_USERINFO = re.compile(
    r"(?<![A-Za-z0-9+.-])(?!hf://)([A-Za-z][A-Za-z0-9+.-]*://)[^\s/?#@\"'<>]+@", re.IGNORECASE
)
# ``?key=value``, ``&key=value``, ``;key=value`` or ``#key=value`` whose key looks secret.
_QUERY_VALUE = re.compile(r"([?&;#])([^=&;#?\s\"'<>]+)=([^&;#\s\"'<>]*)")


def redact_uris(text: str) -> str:
    """``text`` with the credentials of every URI in it replaced by ``***`` (see the module docstring).

    A bare URI, a message that quotes one, a traceback or a JSON document: all work the same way. A text
    without credentials comes back unchanged.
    """
    if "://" not in text and "=" not in text:
        return text
    text = _USERINFO.sub(lambda m: f"{m.group(1)}{MASK}@", text)
    return _QUERY_VALUE.sub(_mask_query_value, text)


def _mask_query_value(match: re.Match[str]) -> str:
    separator, key, value = match.groups()
    if value and value != MASK and SECRET_QUERY_KEYS.search(key):
        return f"{separator}{key}={MASK}"
    return match.group(0)


def secret_environment_values(environ: Mapping[str, str] | None = None) -> list[str]:
    """The values of the secret-looking variables of ``environ`` (default: this process's), longest first."""
    environ = os.environ if environ is None else environ
    values = {
        value
        for name, value in environ.items()
        if len(value) >= MIN_SECRET_LENGTH and _SECRET_ENV.search(name) and not _PLACE_ENV.search(name)
    }
    return sorted(values, key=len, reverse=True)


def redact_text(text: str) -> str:
    """``text`` without URI credentials (:func:`redact_uris`), the value of any secret environment variable
    of this process, credential-shaped values and secret assignments."""
    text = redact_uris(text)
    for value in secret_environment_values():
        if value in text:
            text = text.replace(value, MASK)
    if any(
        marker in text for marker in ("=", "-----", "earer", "eyJ", "hf_", "AKIA", "ASIA", "gh", "sk-", "xox")
    ):
        text = _SECRET_VALUE.sub(MASK, text)
        text = _ASSIGNMENT.sub(
            lambda m: f"{m.group(1) or ''}{m.group(2)}={MASK}" if is_secret_key(m.group(2)) else m.group(0),
            text,
        )
    return text


def is_secret_key(key: str) -> bool:
    """Whether a mapping key or a variable name names a credential (``api_key``, ``hf_token``,
    ``WANDB_API_KEY``, ``AWS_SECRET_ACCESS_KEY``; not ``pad_token``, ``max_tokens``, ``HF_HOME``)."""
    if _TOKENIZER_TOKENS.search(key):
        return False
    return bool(SECRET_KEYS.search(key)) or (bool(_SECRET_ENV.search(key)) and not _PLACE_ENV.search(key))


def redact_record(value: Any) -> Any:
    """A copy of plain data fit to be written down: every string through :func:`redact_text`, and the value
    of every secret-looking key (:func:`is_secret_key`) replaced by ``***`` unless it is empty, a number or
    a boolean."""
    if isinstance(value, Mapping):
        name = value.get("name")  # a Kubernetes-style env entry: {"name": "HF_TOKEN", "value": "..."}
        secret_entry = isinstance(name, str) and "value" in value and is_secret_key(name)
        return {
            str(k): MASK
            if _is_secret_value(v) and (is_secret_key(str(k)) or (secret_entry and k == "value"))
            else redact_record(v)
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [redact_record(v) for v in value]
    if isinstance(value, str):
        return redact_text(value)
    return value


def _is_secret_value(value: Any) -> bool:
    if value is None or isinstance(value, bool | int | float):
        return False
    return bool(value)
