"""Kubernetes API clients for the launcher, and readable API errors.

Credentials, first match wins:

1. ``KUBERNETES_SERVER_URL`` and ``KUBERNETES_AUTH_TOKEN``: the pipeline maps the keys ``server_url`` and
   ``auth_token`` of the ``kubernetes-credentials`` secret to these variables of the step. Optional
   ``KUBERNETES_CA_CERT`` (PEM text or the path of a CA bundle) and
   ``KUBERNETES_INSECURE_SKIP_TLS_VERIFY=true`` (test clusters only).
2. The pod's in-cluster service account (``kubernetes.config.load_incluster_config``): the default on a
   cluster, where the step's service account needs RBAC on ``trainjobs``, ``pods`` and ``pods/log``
   (and, for ``trainer_api_version: auto``, ``get`` on the ``trainjobs.trainer.kubeflow.org`` CRD).
3. A kubeconfig (``KUBECONFIG`` or ``~/.kube/config``), for running the launcher from a workstation.

The token is never logged; errors name the variables, not their values. Each client gets its own
``Configuration``, so nothing changes the ``kubernetes`` package's global default.

The clients made here do not retry a failed request on their own (urllib3 would try a timed-out read
three more times, multiplying every request timeout): the launcher retries what is safe to retry, with
backoff, within its deadlines (see :mod:`kfp_components.launch.trainjob`).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import urllib3
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from kubernetes.config.config_exception import ConfigException

log = logging.getLogger(__name__)

ENV_SERVER_URL = "KUBERNETES_SERVER_URL"
ENV_AUTH_TOKEN = "KUBERNETES_AUTH_TOKEN"
ENV_CA_CERT = "KUBERNETES_CA_CERT"
ENV_INSECURE = "KUBERNETES_INSECURE_SKIP_TLS_VERIFY"
ENV_NAMESPACE = "KUBERNETES_NAMESPACE"
SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


class KubeCredentialsError(RuntimeError):
    """No usable Kubernetes credentials were found."""


def token_api_client(
    server_url: str, token: str, *, ca_cert: str = "", insecure_skip_tls_verify: bool = False
) -> client.ApiClient:
    """A client for ``server_url`` that sends ``Authorization: Bearer <token>``.

    ``ca_cert`` is PEM text or the path of a CA bundle; empty uses the system's trust store.
    """
    configuration = _configuration()
    configuration.host = server_url.rstrip("/")
    configuration.api_key = {"authorization": token}
    configuration.api_key_prefix = {"authorization": "Bearer"}
    configuration.verify_ssl = not insecure_skip_tls_verify
    if ca_cert:
        configuration.ssl_ca_cert = _ca_file(ca_cert)
    return client.ApiClient(configuration)


def api_client_from_environment(environ: Mapping[str, str] | None = None) -> client.ApiClient:
    """A client from the first credentials found (see the module docstring)."""
    env = os.environ if environ is None else environ
    server, token = env.get(ENV_SERVER_URL, ""), env.get(ENV_AUTH_TOKEN, "")
    if server or token:
        if not (server and token):
            missing = ENV_AUTH_TOKEN if server else ENV_SERVER_URL
            raise KubeCredentialsError(
                f"{ENV_SERVER_URL} and {ENV_AUTH_TOKEN} go together; {missing} is empty "
                "(check the kubernetes-credentials secret's keys server_url and auth_token)"
            )
        insecure = env.get(ENV_INSECURE, "").strip().lower() in ("1", "true", "yes")
        log.info("Kubernetes API %s with the token from %s", server, ENV_AUTH_TOKEN)
        return token_api_client(
            server, token, ca_cert=env.get(ENV_CA_CERT, ""), insecure_skip_tls_verify=insecure
        )
    configuration = _configuration()
    try:
        config.load_incluster_config(client_configuration=configuration)
        log.info("Kubernetes API %s with the pod's service account", configuration.host)
        return client.ApiClient(configuration)
    except ConfigException as in_cluster_error:
        try:
            config.load_kube_config(client_configuration=configuration)
        except (ConfigException, OSError) as kubeconfig_error:
            raise KubeCredentialsError(
                "no Kubernetes credentials: set "
                f"{ENV_SERVER_URL} and {ENV_AUTH_TOKEN} (the kubernetes-credentials secret), run in a pod "
                f"with a service account ({in_cluster_error}), or provide a kubeconfig ({kubeconfig_error})"
            ) from None
        log.info("Kubernetes API %s from the kubeconfig", configuration.host)
        return client.ApiClient(configuration)


def default_namespace(environ: Mapping[str, str] | None = None) -> str:
    """``KUBERNETES_NAMESPACE``, else the namespace of the pod's service account, else ``default``."""
    env = os.environ if environ is None else environ
    if env.get(ENV_NAMESPACE):
        return env[ENV_NAMESPACE]
    try:
        return SERVICE_ACCOUNT_NAMESPACE.read_text().strip() or "default"
    except OSError:
        return "default"


def describe_api_error(exc: ApiException) -> str:
    """``"<code> <reason>: <message>"`` from an API error, with the field causes of a 422 listed."""
    message = ""
    causes: list[dict[str, Any]] = []
    try:
        body = json.loads(exc.body or "{}")
        message = body.get("message", "")
        causes = (body.get("details") or {}).get("causes") or []
    except (TypeError, ValueError, AttributeError):  # not a Status object
        message = str(exc.body or "").strip()[:500]
    text = f"{exc.status} {exc.reason}" + (f": {message}" if message else "")
    details = [f"{c.get('field', '')}: {c.get('message', '')}".strip(": ") for c in causes]
    details = [d for d in details if d and d not in message]
    if details:
        text += "\n  " + "\n  ".join(details)
    if exc.status == 401:
        text += (
            f" (the API server did not accept the credentials: check {ENV_AUTH_TOKEN} / the "
            "kubernetes-credentials secret, or the pod's service account token)"
        )
    return text


def _configuration() -> client.Configuration:
    """A fresh client configuration whose requests are tried once (the caller decides about retries)."""
    configuration = client.Configuration()
    configuration.retries = urllib3.Retry(total=0, redirect=False)
    return configuration


def _ca_file(ca_cert: str) -> str:
    if "-----BEGIN" not in ca_cert:
        return ca_cert
    with tempfile.NamedTemporaryFile("w", prefix="kube-ca-", suffix=".crt", delete=False) as handle:
        handle.write(ca_cert)
    return handle.name
