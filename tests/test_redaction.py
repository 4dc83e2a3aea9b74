"""The rules of what may be written down (:mod:`kfp_components.redaction`) and the log filter that applies
them to every record (:class:`kfp_components.logs.RedactSecrets`)."""

from __future__ import annotations

import io
import logging
import os

import pytest

from doubles.private_file_server import Credentials

ENV_SECRETS = {"HF_TOKEN": "hf_envTokenZ81kQm3vX9", "AWS_SECRET_ACCESS_KEY": "awsEnvSecret/Jq7+Lr2Tn5Wp"}


@pytest.fixture
def env_secrets(monkeypatch) -> list[str]:
    for name, value in ENV_SECRETS.items():
        monkeypatch.setenv(name, value)
    return list(ENV_SECRETS.values())


def test_log_filter_redacts_uri_credentials_and_environment_secrets(env_secrets, monkeypatch):
    from kfp_components.logs import configure_logging

    root = logging.getLogger()
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    monkeypatch.setattr(root, "handlers", [handler])
    monkeypatch.setattr(root, "level", root.level)
    configure_logging("DEBUG")
    credentials = Credentials()
    uri = (
        f"https://{credentials.user}:{credentials.password}@data.example/x.jsonl?sig={credentials.sig}&page=2"
    )
    log = logging.getLogger("kfp_components.anything")
    log.info("reading %s with %s", uri, os.environ["HF_TOKEN"])
    log.warning("s3 %r", f"s3://AKIA:{credentials.password}@bucket/key")
    try:
        raise ValueError(f"cannot read {uri}")
    except ValueError:
        log.exception("failed")
    log.info("a bad format %d", "not a number")  # logging reports it; the filter does not fail
    text = stream.getvalue()
    assert "https://***@data.example/x.jsonl?sig=***&page=2" in text and "s3://***@bucket/key" in text
    assert "Traceback" in text and "cannot read https://***@data.example" in text
    assert not [s for s in [*credentials.secrets(), *env_secrets] if s in text]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("https://u:p@h.example/d.jsonl", "https://***@h.example/d.jsonl"),
        ("s3://AKIA:secret@bucket/key", "s3://***@bucket/key"),
        (
            "https://b.s3.amazonaws.com/k?X-Amz-Algorithm=AWS4&X-Amz-Credential=AKIA%2F2024&X-Amz-Signature=ab12",
            "https://b.s3.amazonaws.com/k?X-Amz-Algorithm=AWS4&X-Amz-Credential=***&X-Amz-Signature=***",
        ),
        (
            "https://acct.blob.core.windows.net/c/f?sv=2022&sig=a%2Bb",
            "https://acct.blob.core.windows.net/c/f?sv=2022&sig=***",
        ),
        ("https://h/cb#access_token=abc&state=1", "https://h/cb#access_token=***&state=1"),
        # a message that quotes URIs: each is redacted, the words around them stay
        (
            "cannot read 'https://u:p@a/x?token=t1' nor http://v:q@b/y?page=2&api_key=k2 either",
            "cannot read 'https://***@a/x?token=***' nor http://***@b/y?page=2&api_key=*** either",
        ),
        # nothing secret: unchanged, byte for byte (hf:// uses '@' for a revision)
        ("hf://imdb@main", "hf://imdb@main"),
        ("hf://org/name:cfg@v1.0", "hf://org/name:cfg@v1.0"),
        ("https://h/a%20b.jsonl?page=2&split=train", "https://h/a%20b.jsonl?page=2&split=train"),
        ("/data/chat.jsonl", "/data/chat.jsonl"),
        ("step 3/10 loss=0.5 lr=1e-05", "step 3/10 loss=0.5 lr=1e-05"),
        ("contact ops@example.com", "contact ops@example.com"),
    ],
)
def test_redact_uris(text, expected):
    from kfp_components.redaction import redact_uris

    assert redact_uris(text) == expected
    assert redact_uris(expected) == expected, "redacting twice changes nothing"


def test_redact_text_replaces_secret_environment_values(monkeypatch):
    from kfp_components.redaction import redact_text, secret_environment_values

    monkeypatch.setenv("HF_TOKEN", "hf_abcdefgh12345")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLE000")
    monkeypatch.setenv("MY_SERVICE_PASSWORD", "correct-horse")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/home/kfp/.aws/credentials")  # a place, not a secret
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false-but-long")  # not a secret name
    monkeypatch.setenv("API_TOKEN", "short")  # too short to be told from ordinary words
    values = secret_environment_values()
    assert {"hf_abcdefgh12345", "AKIAEXAMPLE000", "correct-horse"} <= set(values)
    assert not {"/home/kfp/.aws/credentials", "false-but-long", "short"} & set(values)
    text = "token hf_abcdefgh12345 key AKIAEXAMPLE000 pw correct-horse file /home/kfp/.aws/credentials"
    assert redact_text(text) == "token *** key *** pw *** file /home/kfp/.aws/credentials"


def test_redact_record(monkeypatch):
    from kfp_components.redaction import redact_record

    monkeypatch.setenv("HF_TOKEN", "hf_abcdefgh12345")
    record = {
        "dataset_name_or_path": "https://u:p@h/d.jsonl?sig=s1",
        "api_key": "sk-123456789",
        "hf_token": "hf_abcdefgh12345",
        "pad_token": "<|pad|>",
        "max_tokens_per_gpu": 512,
        "password": "",
        "nested": [{"note": "uses hf_abcdefgh12345", "registry_token_env": "REGISTRY_TOKEN"}],
        "metrics": {"eval_token": 0.5},
    }
    assert redact_record(record) == {
        "dataset_name_or_path": "https://***@h/d.jsonl?sig=***",
        "api_key": "***",
        "hf_token": "***",
        "pad_token": "<|pad|>",
        "max_tokens_per_gpu": 512,
        "password": "",
        "nested": [{"note": "uses ***", "registry_token_env": "REGISTRY_TOKEN"}],
        "metrics": {"eval_token": 0.5},
    }
