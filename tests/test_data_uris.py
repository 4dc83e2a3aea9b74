import pytest

from kfp_components.data import DatasetError, parse_dataset_uri, redact_uri


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("hf://org/name", {"scheme": "hf", "repo_id": "org/name", "config": "", "revision": ""}),
        (
            "hf://org/name:cfg@v1.0",
            {"scheme": "hf", "repo_id": "org/name", "config": "cfg", "revision": "v1.0"},
        ),
        ("hf://squad@abc123", {"scheme": "hf", "repo_id": "squad", "revision": "abc123"}),
        (
            "s3://my-bucket/data/train.jsonl",
            {"scheme": "s3", "bucket": "my-bucket", "key": "data/train.jsonl"},
        ),
        ("s3://my-bucket/shards/", {"scheme": "s3", "bucket": "my-bucket", "key": "shards"}),
        ("s3://my-bucket", {"scheme": "s3", "bucket": "my-bucket", "key": ""}),
        ("https://example.com/d.jsonl", {"scheme": "https", "url": "https://example.com/d.jsonl"}),
        (
            "pvc://workspace/data/train.jsonl",
            {"scheme": "pvc", "claim": "workspace", "path": "data/train.jsonl"},
        ),
        ("file:///tmp/x.jsonl", {"scheme": "local", "path": "/tmp/x.jsonl"}),
        ("relative/x.parquet", {"scheme": "local", "path": "relative/x.parquet"}),
    ],
)
def test_parse_valid_uris(uri, expected):
    parsed = parse_dataset_uri(uri)
    for key, value in expected.items():
        assert getattr(parsed, key) == value


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("", "empty"),
        ("ftp://host/x.jsonl", "unsupported scheme 'ftp://'"),
        ("hf://", "not a Hugging Face dataset id"),
        ("hf://org/name:@v1", "empty config"),
        ("hf://org/name@", "empty revision"),
        ("s3://Bad_Bucket/x", "not a valid S3 bucket name"),
        ("pvc://Bad_Claim/x", "not a valid PersistentVolumeClaim name"),
        ("pvc://claim/../etc/passwd", "'..' is not allowed"),
        ("https:///nohost", "no host"),
    ],
)
def test_bad_uris_say_what_is_wrong(uri, message):
    with pytest.raises(DatasetError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_dataset_uri(uri)


def test_pvc_path_resolves_under_the_mount_root(monkeypatch, tmp_path):
    monkeypatch.setenv("KFP_COMPONENTS_PVC_ROOT", str(tmp_path))
    assert parse_dataset_uri("pvc://ws/a/b.jsonl").local_path() == tmp_path / "ws" / "a" / "b.jsonl"


def test_redaction_hides_credentials_and_signatures():
    uri = "https://user:hunter2@host.example/data.jsonl?X-Amz-Signature=abc123&token=t0k&part=1"
    shown = redact_uri(uri)
    assert "hunter2" not in shown and "abc123" not in shown and "t0k" not in shown
    assert "host.example/data.jsonl" in shown and "part=1" in shown
    assert parse_dataset_uri(uri).redacted() == shown
