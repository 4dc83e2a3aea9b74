"""What may be written down: texts and records without credentials.

Everything the package records (``pipeline_config.json``, ``pipeline_state.json``, log lines, error messages,
a Model artifact's metadata) goes through here first:

* :func:`redact_uris` replaces the credentials of every URI in a text: the user info
  (``https://user:pass@host`` -> ``https://***@host``) and the values of secret-looking query and fragment
  keys (``X-Amz-Signature``, ``X-Amz-Credential``, ``sig``, ``token``, ``access_token``, ``api_key``, ...);
  everything else stays as it was, so a record still says where the data came from.
* :func:`redact_text` does that and replaces the values of secret environment variables (``HF_TOKEN``,
  ``AWS_SECRET_ACCESS_KEY``, ``*_PASSWORD``, ``*_API_KEY``, ...) wherever they appear.
* :func:`redact_record` applies :func:`redact_text` to every string of plain data (mappings, lists) and
  replaces the values of secret-looking keys (``api_key``, ``password``, ``hf_token``, ...).

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
    r"(^|_)(TOKEN|SECRET|PASSWORD|PASSWD|API_?KEY|ACCESS_KEY|SECRET_KEY|PRIVATE_KEY|CREDENTIALS?)(_|$)",
    re.IGNORECASE,
)
_PLACE_ENV = re.compile(r"_(FILE|PATH|DIR|ENV|URL|ENDPOINT)$", re.IGNORECASE)
#: Shorter values are not treated as secrets (a flag like ``1`` or ``true`` must not vanish from every log).
MIN_SECRET_LENGTH = 8

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
    """``text`` without URI credentials (:func:`redact_uris`) and without the value of any secret
    environment variable of this process."""
    text = redact_uris(text)
    for value in secret_environment_values():
        if value in text:
            text = text.replace(value, MASK)
    return text


def is_secret_key(key: str) -> bool:
    """Whether a mapping key names a credential (``api_key``, ``hf_token``; not ``pad_token``)."""
    return bool(SECRET_KEYS.search(key)) and not _TOKENIZER_TOKENS.search(key)


def redact_record(value: Any) -> Any:
    """A copy of plain data fit to be written down: every string through :func:`redact_text`, and the value
    of every secret-looking key (:func:`is_secret_key`) replaced by ``***`` unless it is empty, a number or
    a boolean."""
    if isinstance(value, Mapping):
        return {
            str(k): MASK if is_secret_key(str(k)) and _is_secret_value(v) else redact_record(v)
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
