"""Options that name a Kubernetes Secret holding a credential: ``token_secret: <secret>[/<key>]``.

An option group that reads a credential from the environment variable ``token_env`` may also name the
Secret it comes from on a cluster. The TrainJob launcher then gives every worker that variable from the
Secret (a ``secretKeyRef``, never a literal value), so a reward endpoint's or a judge's key reaches the
training pods without being written anywhere. Locally the variable must simply be set. The key inside the
Secret defaults to the variable's name.
"""

from __future__ import annotations

import re

#: A Kubernetes object name (RFC 1123 subdomain), and a Secret key.
_SECRET_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
_SECRET_KEY = re.compile(r"^[-._a-zA-Z0-9]+$")


def token_secret_problems(token_env: str, token_secret: str) -> list[tuple[str, str]]:
    """What is wrong with ``token_secret`` (given with ``token_env``), as ``(key, message)``."""
    if not token_secret:
        return []
    if not token_env:
        return [("token_secret", "needs token_env: the variable the workers get the Secret's key as")]
    name, _, key = token_secret.partition("/")
    problems = []
    if not _SECRET_NAME.match(name) or len(name) > 253:
        problems.append(
            ("token_secret", f"expected <secret>[/<key>] with a Kubernetes name, got {token_secret!r}")
        )
    elif key and not _SECRET_KEY.match(key):
        problems.append(("token_secret", f"the key {key!r} is not a valid Secret key"))
    return problems


def secret_env(token_env: str, token_secret: str) -> dict[str, str]:
    """``{"name": <variable>, "secret": <secret>, "key": <key>}`` for the TrainJob's ``secret_env``."""
    name, _, key = token_secret.partition("/")
    return {"name": token_env, "secret": name, "key": key or token_env}
