"""fetch_hf against a local Hugging Face Hub: the real huggingface_hub client, no internet."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import socket
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from huggingface_hub import constants

from kfp_components.data.errors import DatasetError
from kfp_components.data.fetch_hf import CardConfig, fetch_hf, parse_card_configs, select_data_files
from kfp_components.data.uris import parse_dataset_uri

from doubles.hf_hub_server import LocalHubServer, add_dataset_repo

TOKEN = "hf_localTestToken0123456789abcdef"


def jsonl(*rows: dict) -> str:
    return "".join(json.dumps(row) + "\n" for row in rows)


def parquet(*texts: str) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(pa.table({"text": list(texts)}), buffer)
    return buffer.getvalue()


def card(front_matter: str) -> str:
    return f"---\n{front_matter.strip()}\n---\n\n# A dataset\n"


@pytest.fixture
def hf_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The client environment of a pod that may reach the Hub: no token, caches under tmp_path.

    huggingface_hub reads most of its environment once, at import (conftest.py sets HF_HUB_OFFLINE=1
    before that), so the values it already read are patched as well.
    """
    home = tmp_path / "hf_home"
    for name in (
        "HF_TOKEN",
        "HUGGING_FACE_HUB_TOKEN",
        "HF_HUB_OFFLINE",
        "TRANSFORMERS_OFFLINE",
        "HF_ENDPOINT",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("HF_OIDC_RESOURCE", raising=False)
    environment = {
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(home / "hub"),
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_ETAG_TIMEOUT": "5",
        "HF_HUB_DOWNLOAD_TIMEOUT": "5",
    }
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    read_at_import = {
        "HF_HUB_OFFLINE": False,
        "HF_HUB_DISABLE_TELEMETRY": True,
        "HF_HUB_DISABLE_IMPLICIT_TOKEN": False,
        "HF_HUB_ETAG_TIMEOUT": 5,
        "HF_HUB_DOWNLOAD_TIMEOUT": 5,
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(home / "hub"),
        "HF_ASSETS_CACHE": str(home / "assets"),
        "HF_XET_CACHE": str(home / "xet"),
        "HF_TOKEN_PATH": str(home / "token"),
        "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"),
        "AGENT_HARNESSES_PATH": str(home / ".agent_harnesses.json"),
    }
    for name, value in read_at_import.items():
        monkeypatch.setattr(constants, name, value)


@contextmanager
def serving(
    root: Path, monkeypatch: pytest.MonkeyPatch, token: str | None = None
) -> Iterator[LocalHubServer]:
    with LocalHubServer(root, token=token) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
        yield server


@pytest.fixture
def hub_root(tmp_path: Path) -> Path:
    return tmp_path / "hub"


@pytest.fixture
def hub(hub_root: Path, hf_env: None, monkeypatch: pytest.MonkeyPatch) -> Iterator[LocalHubServer]:
    hub_root.mkdir()
    with serving(hub_root, monkeypatch) as server:
        yield server


def fetch(uri: str, split: str, dest: Path) -> list[Path]:
    return fetch_hf(parse_dataset_uri(uri), split, dest)


# -- against the local Hub -------------------------------------------------------------------------


def test_single_jsonl_file_repo(hub: LocalHubServer, hub_root: Path, tmp_path: Path, caplog):
    rows = jsonl({"text": "a"}, {"text": "b"})
    add_dataset_repo(
        hub_root, "org/single", {"conversations.jsonl": rows, ".gitattributes": "*.parquet lfs\n"}
    )
    caplog.set_level(logging.INFO, logger="kfp_components")

    files = fetch("hf://org/single", "train", tmp_path / "out")

    assert files == [tmp_path / "out" / "conversations.jsonl"]
    assert files[0].read_text() == rows
    sha = hub.commit_sha("org/single")
    assert [(r.method, r.path) for r in hub.requests] == [
        ("GET", "/api/datasets/org/single/revision/main"),
        ("HEAD", f"/datasets/org/single/resolve/{sha}/conversations.jsonl"),
        ("GET", f"/datasets/org/single/resolve/{sha}/conversations.jsonl"),
    ]
    messages = [r.getMessage() for r in caplog.records if r.name == "kfp_components.data.fetch_hf"]
    assert f"downloaded conversations.jsonl ({len(rows)} bytes)" in messages
    assert any(m.startswith("fetched hf://org/single split 'train': 1 file(s)") for m in messages)


def test_parquet_shards_are_selected_by_split(hub: LocalHubServer, hub_root: Path, tmp_path: Path):
    add_dataset_repo(
        hub_root,
        "org/shards",
        {
            "README.md": "# no front matter\n",
            "data/train-00000-of-00002.parquet": parquet("t0", "t1"),
            "data/train-00001-of-00002.parquet": parquet("t2"),
            "data/test-00000-of-00001.parquet": parquet("x0"),
            "dataset_infos.json": "{}",
        },
    )

    train = fetch("hf://org/shards", "train", tmp_path / "train")
    test = fetch("hf://org/shards", "test", tmp_path / "test")

    assert [p.relative_to(tmp_path / "train").as_posix() for p in train] == [
        "data/train-00000-of-00002.parquet",
        "data/train-00001-of-00002.parquet",
    ]
    assert [t for p in train for t in pq.read_table(p).column("text").to_pylist()] == ["t0", "t1", "t2"]
    assert [p.name for p in test] == ["test-00000-of-00001.parquet"]
    assert pq.read_table(test[0]).column("text").to_pylist() == ["x0"]
    assert not (tmp_path / "train" / "README.md").exists()


def test_config_folder_selects_its_files(hub: LocalHubServer, hub_root: Path, tmp_path: Path):
    add_dataset_repo(
        hub_root,
        "org/multi",
        {
            "en/train.jsonl": jsonl({"text": "hello"}),
            "en/test.jsonl": jsonl({"text": "bye"}),
            "data/fr/train-00000.parquet": parquet("bonjour"),
            "de_train.jsonl": jsonl({"text": "hallo"}),
        },
    )

    assert [
        p.relative_to(tmp_path / "en").as_posix()
        for p in fetch("hf://org/multi:en", "train", tmp_path / "en")
    ] == ["en/train.jsonl"]
    fr = fetch("hf://org/multi:fr", "train", tmp_path / "fr")
    assert [p.relative_to(tmp_path / "fr").as_posix() for p in fr] == ["data/fr/train-00000.parquet"]
    de = fetch("hf://org/multi:de", "train", tmp_path / "de")
    assert [p.name for p in de] == ["de_train.jsonl"]


def test_readme_configs_mapping_takes_priority(hub: LocalHubServer, hub_root: Path, tmp_path: Path):
    readme = card(
        """
configs:
- config_name: sft
  default: true
  data_files:
  - split: train
    path: "chat/part-*.jsonl"
  - split: test
    path: chat/heldout.jsonl
- config_name: prefs
  data_files: "pairs/**/*.parquet"
"""
    )
    add_dataset_repo(
        hub_root,
        "org/card",
        {
            "README.md": readme,
            "chat/part-0.jsonl": jsonl({"text": "p0"}),
            "chat/part-1.jsonl": jsonl({"text": "p1"}),
            "chat/heldout.jsonl": jsonl({"text": "h"}),
            "chat/train.jsonl": jsonl({"text": "not in the card"}),
            "pairs/2024/a.parquet": parquet("pa"),
            "pairs/2025/b.parquet": parquet("pb"),
        },
    )

    default = fetch("hf://org/card", "train", tmp_path / "default")
    assert [p.name for p in default] == ["part-0.jsonl", "part-1.jsonl"]
    assert [p.name for p in fetch("hf://org/card:sft", "test", tmp_path / "sft")] == ["heldout.jsonl"]
    prefs = fetch("hf://org/card:prefs", "train", tmp_path / "prefs")
    assert [p.relative_to(tmp_path / "prefs").as_posix() for p in prefs] == [
        "pairs/2024/a.parquet",
        "pairs/2025/b.parquet",
    ]
    with pytest.raises(
        DatasetError, match=r"unknown config 'dpo'; available configs \(README.md\): sft, prefs"
    ):
        fetch("hf://org/card:dpo", "train", tmp_path / "dpo")
    with pytest.raises(DatasetError, match=r"config 'prefs' has no split 'test'; splits: train"):
        fetch("hf://org/card:prefs", "test", tmp_path / "prefs-test")


def test_revision_pinning(hub: LocalHubServer, hub_root: Path, tmp_path: Path):
    add_dataset_repo(hub_root, "org/versioned", {"train.jsonl": jsonl({"text": "new"})})
    add_dataset_repo(hub_root, "org/versioned", {"train.jsonl": jsonl({"text": "old"})}, revision="v1")
    v1_sha = hub.commit_sha("org/versioned", "v1")

    assert fetch("hf://org/versioned", "train", tmp_path / "main")[0].read_text() == jsonl({"text": "new"})
    assert fetch("hf://org/versioned@v1", "train", tmp_path / "v1")[0].read_text() == jsonl({"text": "old"})
    by_sha = fetch(f"hf://org/versioned@{v1_sha}", "train", tmp_path / "sha")
    assert by_sha[0].read_text() == jsonl({"text": "old"})
    assert f"/datasets/org/versioned/resolve/{v1_sha}/train.jsonl" in {r.path for r in hub.requests}

    with pytest.raises(DatasetError, match=r"revision 'v2' not found in dataset repo 'org/versioned'"):
        fetch("hf://org/versioned@v2", "train", tmp_path / "v2")


def test_unknown_split_lists_the_splits_found(hub: LocalHubServer, hub_root: Path, tmp_path: Path):
    add_dataset_repo(hub_root, "org/splits", {"train.jsonl": jsonl({"t": 1}), "dev.jsonl": jsonl({"t": 2})})

    assert [p.name for p in fetch("hf://org/splits", "validation", tmp_path / "val")] == ["dev.jsonl"]
    with pytest.raises(DatasetError) as caught:
        fetch("hf://org/splits", "test", tmp_path / "test")
    assert (
        str(caught.value)
        == "dataset_name_or_path 'hf://org/splits': no files for split 'test'; splits found: train, validation"
    )


def test_unknown_config_lists_config_folders(hub: LocalHubServer, hub_root: Path, tmp_path: Path):
    add_dataset_repo(hub_root, "org/cfgs", {"en/train.jsonl": "{}\n", "fr/train.jsonl": "{}\n"})
    add_dataset_repo(hub_root, "org/flat", {"train.jsonl": "{}\n"})

    with pytest.raises(DatasetError, match=r"unknown config 'de'; available configs: en, fr"):
        fetch("hf://org/cfgs:de", "train", tmp_path / "de")
    with pytest.raises(DatasetError, match=r"unknown config 'de'; the repo defines no configs"):
        fetch("hf://org/flat:de", "train", tmp_path / "flat")
    assert len(fetch("hf://org/flat:default", "train", tmp_path / "default")) == 1


def test_repo_without_data_files(hub: LocalHubServer, hub_root: Path, tmp_path: Path):
    add_dataset_repo(hub_root, "org/csv", {"README.md": "# csv\n", "train.csv": "a,b\n"})

    with pytest.raises(
        DatasetError, match=r"no data files \(.jsonl/.json/.parquet\); files found: README.md, train.csv"
    ):
        fetch("hf://org/csv", "train", tmp_path / "out")


def test_missing_repo(hub: LocalHubServer, tmp_path: Path):
    with pytest.raises(DatasetError) as caught:
        fetch("hf://org/missing", "train", tmp_path / "out")
    message = str(caught.value)
    assert "dataset repo 'org/missing' not found on http://127.0.0.1:" in message
    assert "(HF_ENDPOINT)" in message and "HF_TOKEN is not set" in message


def test_unreachable_endpoint_is_named(hf_env: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}/")

    with pytest.raises(
        DatasetError, match=rf"could not reach the Hub at http://127.0.0.1:{port} \(HF_ENDPOINT\)"
    ):
        fetch("hf://org/any", "train", tmp_path / "out")


def test_offline_mode_is_explained(hub: LocalHubServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    with pytest.raises(DatasetError, match="HF_HUB_OFFLINE is set"):
        fetch("hf://org/any", "train", tmp_path / "out")
    assert hub.requests == []


def test_private_repo_needs_hf_token(
    hf_env: None, hub_root: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog
):
    add_dataset_repo(hub_root, "org/private", {"train.jsonl": jsonl({"text": "secret data"})})
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="huggingface_hub")

    with serving(hub_root, monkeypatch, token=TOKEN) as server:
        with pytest.raises(DatasetError) as no_token:
            fetch("hf://org/private", "train", tmp_path / "none")
        monkeypatch.setenv("HF_TOKEN", "hf_wrongToken")
        with pytest.raises(DatasetError) as wrong_token:
            fetch("hf://org/private", "train", tmp_path / "wrong")
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        server.clear_requests()
        files = fetch("hf://org/private", "train", tmp_path / "ok")
        requests = server.requests

    assert "requires authentication" in str(no_token.value) and "HF_TOKEN is not set" in str(no_token.value)
    assert "HF_TOKEN is set but was not accepted" in str(wrong_token.value)
    assert "hf_wrongToken" not in str(wrong_token.value)
    assert files[0].read_text() == jsonl({"text": "secret data"})
    assert len(requests) == 3 and all(r.has_auth_header for r in requests)
    for error in (no_token.value, wrong_token.value):
        assert TOKEN not in str(error) and TOKEN not in repr(error.__cause__)
    assert caplog.records, "expected DEBUG records from the client and from fetch_hf"
    for record in caplog.records:
        assert TOKEN not in record.getMessage(), record.name
    assert TOKEN not in caplog.text


# -- selection rules without a server ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("files", "split", "expected"),
    [
        (["train.jsonl", "test.jsonl"], "train", ["train.jsonl"]),
        (["data/train/a.jsonl", "data/train/b.jsonl", "data/test/a.jsonl"], "test", ["data/test/a.jsonl"]),
        (
            ["test_part1.json", "test_part2.json", "train_part1.json"],
            "test",
            ["test_part1.json", "test_part2.json"],
        ),
        (
            ["train.jsonl", "valid.jsonl", "val-2.jsonl", "dev.jsonl"],
            "validation",
            ["dev.jsonl", "val-2.jsonl", "valid.jsonl"],
        ),
        (["train.jsonl", "validation.jsonl"], "dev", ["validation.jsonl"]),
        (["a.jsonl", "b.parquet"], "train", ["a.jsonl", "b.parquet"]),  # no file names a split
        (["contest.jsonl", "trainer.json", "train.jsonl"], "train", ["train.jsonl"]),  # whole words only
        (
            ["train/test_examples.jsonl", "test/x.jsonl"],
            "train",
            ["train/test_examples.jsonl"],
        ),  # folder first
        (["train.jsonl", "train_sft.jsonl"], "train_sft", ["train_sft.jsonl"]),  # longest word wins
        (["train.jsonl", ".hidden/test.jsonl", "state.json", "notes.txt"], "train", ["train.jsonl"]),
    ],
)
def test_split_conventions(files: list[str], split: str, expected: list[str]):
    assert select_data_files(files, split) == expected


@pytest.mark.parametrize(
    ("front_matter", "expected"),
    [
        ("configs:\n- config_name: a\n  data_files: x/*.jsonl", [CardConfig("a", {"train": ["x/*.jsonl"]})]),
        (
            "configs:\n- config_name: a\n  data_files: [x.jsonl, y.jsonl]",
            [CardConfig("a", {"train": ["x.jsonl", "y.jsonl"]})],
        ),
        (
            "configs:\n- config_name: a\n  data_dir: d\n  data_files:\n  - split: test\n    path: [t1.json, t2.json]",
            [CardConfig("a", {"test": ["d/t1.json", "d/t2.json"]}, data_dir="d")],
        ),
        (
            "configs:\n- data_dir: only_dir\n  default: true",
            [CardConfig("default", None, "only_dir", default=True)],
        ),
        ("license: mit", []),
    ],
)
def test_parse_card_configs(front_matter: str, expected: list[CardConfig]):
    assert parse_card_configs(card(front_matter)) == expected


@pytest.mark.parametrize(
    ("front_matter", "message"),
    [
        ("configs: [unclosed", "not valid YAML"),
        ("configs: {a: b}", "'configs' must be a list"),
        ("configs:\n- config_name: a\n  data_files: 3", r"configs\[0\] \('a'\).data_files must be"),
        ("configs:\n- config_name: a\n- config_name: a", "defined more than once: a"),
    ],
)
def test_parse_card_configs_rejects_malformed_cards(front_matter: str, message: str):
    with pytest.raises(DatasetError, match=message):
        parse_card_configs(card(front_matter), source="dataset_name_or_path 'hf://org/x'")


def test_glob_patterns_follow_the_hub():
    files = ["data/train-0.parquet", "data/sub/train-1.parquet", "train-2.parquet"]
    star = [CardConfig("c", {"train": ["data/*.parquet"]})]
    double_star = [CardConfig("c", {"train": ["**/train-*.parquet"]})]

    assert select_data_files(files, "train", card_configs=star) == ["data/train-0.parquet"]
    assert select_data_files(files, "train", card_configs=double_star) == sorted(files)
    with pytest.raises(DatasetError, match="several configs"):
        select_data_files(files, "train", card_configs=[CardConfig("a", None), CardConfig("b", None)])


# -- the local Hub itself -----------------------------------------------------------------------------


def test_local_hub_speaks_the_hub_protocol(hub_root: Path, tmp_path: Path):
    add_dataset_repo(hub_root, "org/raw", {"a.jsonl": "{}\n"})
    (tmp_path / "outside.txt").write_text("not served")

    def call(server: LocalHubServer, method: str, path: str, token: str | None = None):
        request = urllib.request.Request(server.endpoint + path, method=method)
        if token:
            request.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                return response.status, response.headers, response.read()
        except urllib.error.HTTPError as error:
            return error.code, error.headers, error.read()

    with LocalHubServer(hub_root) as server:
        sha = server.commit_sha("org/raw")
        status, headers, body = call(server, "HEAD", "/datasets/org/raw/resolve/main/a.jsonl")
        assert (status, headers["X-Repo-Commit"], headers["Content-Length"], body) == (200, sha, "3", b"")
        assert headers["ETag"].strip('"') == hashlib.sha256(b"{}\n").hexdigest()
        assert not [name for name in headers if name.lower().startswith("x-xet")]
        assert call(server, "GET", "/api/agent-harnesses")[2] == b'{"standardEnvVars": [], "harnesses": {}}'
        for path, code in [
            ("/datasets/org/nope/resolve/main/a.jsonl", "RepoNotFound"),
            ("/datasets/org/raw/resolve/v9/a.jsonl", "RevisionNotFound"),
            ("/datasets/org/raw/resolve/main/b.jsonl", "EntryNotFound"),
            ("/datasets/org/raw/resolve/main/..%2F..%2F..%2F..%2Foutside.txt", "EntryNotFound"),
            ("/datasets/org/raw/resolve/..%2F..%2F..%2F..%2F/outside.txt", "RevisionNotFound"),
        ]:
            status, headers, _ = call(server, "GET", path)
            assert (status, headers["X-Error-Code"]) == (404, code), path

    with LocalHubServer(hub_root, token=TOKEN) as server:
        assert call(server, "GET", "/api/datasets/org/raw/revision/main")[0] == 401
        assert call(server, "GET", "/api/datasets/org/raw/revision/main", token="hf_other")[0] == 401
        status, _, body = call(server, "GET", "/api/datasets/org/raw/revision/main", token=TOKEN)
        assert status == 200 and json.loads(body)["siblings"] == [{"rfilename": "a.jsonl"}]
        assert [r.has_auth_header for r in server.requests] == [False, True, True]
        assert TOKEN not in repr(server)


def test_prepare_dataset_reads_hf_split_end_to_end(hub: LocalHubServer, hub_root: Path, tmp_path: Path):
    from kfp_components.data import DatasetConfig, prepare_dataset

    def chat_rows(tag: str, n: int) -> str:
        return jsonl(
            *(
                {
                    "messages": [
                        {"role": "user", "content": f"{tag} q{i}"},
                        {"role": "assistant", "content": "a"},
                    ]
                }
                for i in range(n)
            )
        )

    add_dataset_repo(
        hub_root,
        "org/chat",
        {"data/train-00000-of-00001.jsonl": chat_rows("train", 6), "data/test.jsonl": chat_rows("test", 2)},
    )
    out = tmp_path / "prepared"
    result = prepare_dataset(
        DatasetConfig("hf://org/chat", dataset_split="test", train_split_ratio=1.0), out / "t", out / "e"
    )
    assert result.files == ["data/test.jsonl"] and result.metrics["train_rows"] == 2
    assert all("test q" in line for line in (out / "t").read_text().splitlines())
