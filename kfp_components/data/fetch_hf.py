"""Download the data files of one split of a Hugging Face Hub dataset repository (``hf://`` URIs).

Talks to the Hub through the ``huggingface_hub`` client, configured the way that client reads its
environment: the endpoint from ``HF_ENDPOINT`` (read at call time, so a mirror or a local test Hub
can be chosen per call), the token from ``HF_TOKEN`` (or the client's token file). The token is
never passed around, logged or put in an error message by this module.

Which files form a split follows the Hub's own conventions for data files:

1. If the repo's ``README.md`` has YAML front matter with ``configs:``, that mapping decides: each
   ``config_name`` lists its ``data_files`` as a glob string, a list of globs, or a list of
   ``{split, path}`` entries (``*`` stays in one folder, ``**`` crosses folders), optionally under a
   ``data_dir``.
2. Otherwise a config (``hf://org/name:cfg``) selects the files under a folder named ``cfg`` or whose
   file name starts with ``cfg``; a file belongs to the split named by one of its folders (innermost
   first) or else by its file name, the split being a whole word between ``/ _ . -`` or the ends:
   ``train.jsonl``, ``data/train-00000-of-00002.parquet``, ``test/part1.json``. ``validation`` is also
   spelled ``valid``, ``val`` or ``dev``. When no file names any split, every file is ``train``.

Only ``.jsonl``, ``.json`` and ``.parquet`` files are data files; hidden files and the metadata files
that ``datasets`` writes (``dataset_info.json`` ...) are not.
"""

from __future__ import annotations

import importlib
import logging
import os
import re
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path, PurePosixPath

import yaml
from huggingface_hub import HfApi, constants
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from kfp_components.data.errors import DatasetError
from kfp_components.data.uris import DatasetURI, redact_uri

logger = logging.getLogger(__name__)

#: File name endings of the data files a split is made of.
DATA_FILE_EXTENSIONS = (".jsonl", ".json", ".parquet")
#: Revision used when the URI names none.
DEFAULT_REVISION = "main"
#: Split name -> the split it is a spelling of.
SPLIT_ALIASES: dict[str, str] = {
    "train": "train",
    "validation": "validation",
    "valid": "validation",
    "val": "validation",
    "dev": "validation",
    "test": "test",
}

#: JSON files that describe a dataset rather than hold its rows.
_METADATA_FILES = frozenset(
    {"dataset_info.json", "dataset_infos.json", "dataset_dict.json", "state.json", "croissant.json"}
)
#: Folder names that say nothing about the config (``data/train-*.parquet`` is the default layout).
_NON_CONFIG_FOLDERS = frozenset({"data"})
_README = "README.md"
_FRONT_MATTER = re.compile(r"\A\ufeff?---[ \t]*\r?\n(.*?)\r?\n---[ \t]*(?:\r?\n|\Z)", re.DOTALL)
_WORD_SEPARATORS = "_.-"
_MAX_PARALLEL_DOWNLOADS = 8


@dataclass(frozen=True)
class CardConfig:
    """One entry of ``configs:`` in a dataset card (the YAML front matter of ``README.md``).

    ``data_files`` maps split name -> glob patterns relative to the repo root, or is ``None`` when the
    entry lists none (then the folder conventions apply, under ``data_dir`` if set).
    """

    name: str
    data_files: dict[str, list[str]] | None = None
    data_dir: str = ""
    default: bool = False

    @property
    def splits(self) -> list[str]:
        """The split names ``data_files`` defines."""
        return list(self.data_files or ())


def fetch_hf(uri: DatasetURI, split: str, dest: Path) -> list[Path]:
    """Download the data files of ``split`` of the dataset repo ``uri`` into ``dest``.

    Files keep their repo paths under ``dest`` (``dest/data/train-00000.parquet``); the client keeps
    its download metadata in ``dest/.cache/huggingface``. All files come from the one commit that the
    revision (``uri.revision`` or ``main``) pointed to when the repo was listed. Returns the local data
    files, sorted. Raises :class:`DatasetError` saying what is wrong: unknown repo, revision, config
    or split, a private or gated repo without a token, an unreachable endpoint, no data files.
    """
    if uri.scheme != "hf":
        raise ValueError(f"fetch_hf needs an hf:// URI, got {uri.scheme}://")
    source = f"dataset_name_or_path {uri.redacted()!r}"
    split = split.strip()
    if not split:
        raise DatasetError(f"{source}: the split name is empty")
    revision = uri.revision or DEFAULT_REVISION
    endpoint = _endpoint_from_environment()
    api = HfApi(endpoint=endpoint, library_name="kfp-components", library_version=_package_version())
    dest = Path(dest)

    with _hub_errors(uri, revision, endpoint):
        info = api.dataset_info(uri.repo_id, revision=revision, timeout=constants.HF_HUB_DOWNLOAD_TIMEOUT)
        commit = info.sha or revision
        repo_files = sorted(sibling.rfilename for sibling in info.siblings or ())
        card_configs: list[CardConfig] = []
        if _README in repo_files:
            with tempfile.TemporaryDirectory(prefix="kfp-hf-card-") as card_dir:
                readme = api.hf_hub_download(
                    uri.repo_id, _README, repo_type="dataset", revision=commit, local_dir=card_dir
                )
                card_text = Path(readme).read_text(encoding="utf-8", errors="replace")
            card_configs = parse_card_configs(card_text, source=source)
        selected = select_data_files(
            repo_files, split, config=uri.config, card_configs=card_configs, source=source
        )
        logger.info(
            "fetching %d file(s) of split %r from %s (commit %s)",
            len(selected),
            split,
            uri.redacted(),
            commit,
        )
        paths = _download_all(api, uri.repo_id, commit, selected, dest)

    total_bytes = sum(path.stat().st_size for path in paths)
    logger.info(
        "fetched %s split %r: %d file(s), %d bytes into %s",
        uri.redacted(),
        split,
        len(paths),
        total_bytes,
        dest,
    )
    return sorted(paths)


def select_data_files(
    repo_files: Iterable[str],
    split: str,
    *,
    config: str = "",
    card_configs: Sequence[CardConfig] = (),
    source: str = "dataset",
) -> list[str]:
    """The repo paths of the data files of ``split`` (and ``config``), sorted.

    ``card_configs`` (from :func:`parse_card_configs`) take priority over the folder conventions.
    ``source`` starts every error message (e.g. ``"dataset_name_or_path 'hf://org/name'"``).
    Raises :class:`DatasetError` for an unknown config or split, or when nothing is left.
    """
    files = sorted({path.lstrip("/") for path in repo_files if not _is_hidden(path)})
    if card_configs:
        chosen = _choose_card_config(card_configs, config, source)
        if chosen.data_files is not None:
            return _select_from_card(files, chosen, split, source)
        files = _under(files, chosen.data_dir) if chosen.data_dir else files
        where = f"config {chosen.name!r}" + (f" (data_dir {chosen.data_dir!r})" if chosen.data_dir else "")
        return _select_by_convention(_data_files(files), split, "", source, where)

    candidates = _data_files(files)
    if not candidates:
        raise DatasetError(f"{source}: the repo has no data files ({_describe_extensions()}){_found(files)}")
    if config == "default" and not _has_folder(candidates, config):
        config = ""  # the Hub's name for the one config of a repo that defines none
    if config:
        in_config = [path for path in candidates if _in_config(path, config)]
        if not in_config:
            available = _folder_configs(candidates)
            hint = (
                f"available configs: {', '.join(available)}"
                if available
                else "the repo defines no configs (no README.md 'configs:' and no config folders); "
                "leave ':config' out of the URI"
            )
            raise DatasetError(f"{source}: unknown config {config!r}; {hint}")
        candidates = in_config
    return _select_by_convention(candidates, split, config, source, f"config {config!r}" if config else "")


def parse_card_configs(readme: str, source: str = "dataset") -> list[CardConfig]:
    """The ``configs:`` of a dataset card, or ``[]`` when it has no front matter or no ``configs``.

    Raises :class:`DatasetError` (its message starting with ``source``) when the front matter is not
    valid YAML or ``configs`` is malformed.
    """
    match = _FRONT_MATTER.match(readme)
    if match is None:
        return []
    try:
        metadata = yaml.safe_load(match.group(1))
    except yaml.YAMLError as error:
        raise DatasetError(
            f"{source}: README.md: the YAML front matter is not valid YAML ({_first_line(error)})"
        ) from None
    if not isinstance(metadata, dict) or metadata.get("configs") is None:
        return []
    entries = metadata["configs"]
    if not isinstance(entries, list):
        raise DatasetError(
            f"{source}: README.md: 'configs' must be a list of {{config_name, data_files}} entries"
        )
    configs: list[CardConfig] = []
    for index, entry in enumerate(entries):
        where = f"{source}: README.md configs[{index}]"
        if not isinstance(entry, dict):
            raise DatasetError(f"{where} must be a mapping with config_name and data_files")
        name = str(entry.get("config_name", "default"))
        data_dir = str(entry.get("data_dir") or "").strip("/")
        data_files = _card_data_files(entry.get("data_files"), f"{where} ({name!r}).data_files")
        if data_files is not None and data_dir:
            data_files = {s: [f"{data_dir}/{p.lstrip('/')}" for p in ps] for s, ps in data_files.items()}
        configs.append(CardConfig(name, data_files, data_dir, default=entry.get("default") is True))
    names = [config.name for config in configs]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise DatasetError(
            f"{source}: README.md: config name(s) defined more than once: {', '.join(duplicates)}"
        )
    return configs


# -- selection helpers ---------------------------------------------------------------------------


def _choose_card_config(configs: Sequence[CardConfig], config: str, source: str) -> CardConfig:
    names = ", ".join(c.name for c in configs)
    if config:
        for candidate in configs:
            if candidate.name == config:
                return candidate
        raise DatasetError(f"{source}: unknown config {config!r}; available configs (README.md): {names}")
    defaults = [c for c in configs if c.default] or [c for c in configs if c.name == "default"]
    if len(defaults) == 1:
        return defaults[0]
    if len(configs) == 1:
        return configs[0]
    raise DatasetError(
        f"{source}: the repo has several configs ({names}); choose one with hf://org/name:<config>"
    )


def _select_from_card(files: list[str], config: CardConfig, split: str, source: str) -> list[str]:
    assert config.data_files is not None
    split_key = _match_split_name(split, config.data_files)
    if split_key is None:
        raise DatasetError(
            f"{source}: config {config.name!r} has no split {split!r}; splits: {', '.join(config.splits)}"
        )
    patterns = config.data_files[split_key]
    matched = sorted({path for pattern in patterns for path in files if _glob(pattern).match(path)})
    where = f"config {config.name!r} split {split_key!r}"
    if not matched:
        raise DatasetError(
            f"{source}: {where}: data_files {', '.join(map(repr, patterns))} match no file in the repo"
        )
    data = _data_files(matched)
    if not data:
        raise DatasetError(f"{source}: {where} has no data files ({_describe_extensions()}){_found(matched)}")
    return data


def _select_by_convention(
    candidates: list[str], split: str, config: str, source: str, where: str
) -> list[str]:
    """Group ``candidates`` by the split their path names and return those of ``split``."""
    in_where = f" in {where}" if where else ""
    if not candidates:
        raise DatasetError(f"{source}: no data files ({_describe_extensions()}){in_where}")
    wanted = _canonical_split(split)
    keywords = {**SPLIT_ALIASES, wanted: wanted}  # a custom split name ('train_sft') counts as a word too
    by_split: dict[str, list[str]] = {}
    unassigned: list[str] = []
    for path in candidates:
        found = _split_of(path, keywords, ignore=config)
        if found is None:
            unassigned.append(path)
        else:
            by_split.setdefault(found, []).append(path)
    if not by_split:
        by_split = {"train": candidates}  # no file names a split: the whole dataset is its train split
        unassigned = []
    if wanted not in by_split:
        raise DatasetError(
            f"{source}: no files for split {split!r}{in_where}; splits found: {', '.join(sorted(by_split))}"
        )
    if unassigned:
        logger.info("ignoring %d data file(s) that name no split: %s", len(unassigned), _sample(unassigned))
    return by_split[wanted]


def _split_of(path: str, keywords: dict[str, str], ignore: str) -> str | None:
    """The split a path names: its innermost folder that names one, else its file name."""
    *folders, name = path.split("/")
    for component in [*reversed(folders), name]:
        if component == ignore:
            continue
        hits = [(len(word), split) for word, split in keywords.items() if _names_word(component, word)]
        if hits:
            return max(hits)[1]  # the longest word wins: 'train_sft' over 'train'
    return None


def _names_word(component: str, word: str) -> bool:
    sep = re.escape(_WORD_SEPARATORS)
    return re.search(rf"(?:^|[{sep}]){re.escape(word)}(?:$|[{sep}])", component, re.IGNORECASE) is not None


def _canonical_split(split: str) -> str:
    return SPLIT_ALIASES.get(split.lower(), split.lower())


def _match_split_name(split: str, available: Iterable[str]) -> str | None:
    names = list(available)
    if split in names:
        return split
    wanted = _canonical_split(split)
    same = [name for name in names if _canonical_split(name) == wanted]
    return same[0] if len(same) == 1 else None


def _in_config(path: str, config: str) -> bool:
    *folders, name = path.split("/")
    return config in folders or _starts_with_word(name, config)


def _starts_with_word(name: str, word: str) -> bool:
    return name.startswith(word) and (len(name) == len(word) or name[len(word)] in _WORD_SEPARATORS)


def _has_folder(paths: Iterable[str], folder: str) -> bool:
    return any(folder in path.split("/")[:-1] for path in paths)


def _folder_configs(paths: Iterable[str]) -> list[str]:
    """Folder names that look like configs: not a split name, not ``data``."""
    names = {
        folder
        for path in paths
        for folder in path.split("/")[:-1]
        if folder not in _NON_CONFIG_FOLDERS and not any(_names_word(folder, w) for w in SPLIT_ALIASES)
    }
    return sorted(names)


def _under(paths: Iterable[str], folder: str) -> list[str]:
    prefix = folder.rstrip("/") + "/"
    return [path for path in paths if path.startswith(prefix)]


def _data_files(paths: Iterable[str]) -> list[str]:
    return [
        path
        for path in paths
        if path.lower().endswith(DATA_FILE_EXTENSIONS) and PurePosixPath(path).name not in _METADATA_FILES
    ]


def _is_hidden(path: str) -> bool:
    return any(part.startswith(".") for part in path.split("/"))


def _card_data_files(value: object, where: str) -> dict[str, list[str]] | None:
    """Normalise the ``data_files`` forms a dataset card allows to split -> patterns."""
    if value is None:
        return None
    if isinstance(value, str):
        return {"train": [value]}
    if isinstance(value, dict):
        return {str(split): _patterns(paths, f"{where}.{split}") for split, paths in value.items()}
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return {"train": list(value)}
    if isinstance(value, list):
        result: dict[str, list[str]] = {}
        for index, item in enumerate(value):
            if not isinstance(item, dict) or "path" not in item:
                raise DatasetError(f"{where}[{index}] must be a glob string or a {{split, path}} mapping")
            split = str(item.get("split", "train"))
            result.setdefault(split, []).extend(_patterns(item["path"], f"{where}[{index}].path"))
        return result
    raise DatasetError(
        f"{where} must be a glob string, a list of globs, or a list of {{split, path}} entries"
    )


def _patterns(value: object, where: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and all(isinstance(item, str) for item in value):
        return list(value)
    raise DatasetError(f"{where} must be a glob string or a non-empty list of glob strings")


@cache
def _glob(pattern: str) -> re.Pattern[str]:
    """A glob as the Hub reads ``data_files``: ``*``/``?``/``[..]`` stay in one folder, ``**`` crosses them."""
    pattern = pattern.strip().removeprefix("./").lstrip("/")
    out: list[str] = []
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        elif pattern[i] == "[" and (end := pattern.find("]", i + 2)) != -1:
            body = pattern[i + 1 : end].replace("\\", "\\\\")
            out.append("[" + ("^" + body[1:] if body.startswith("!") else body) + "]")
            i = end + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out) + r"\Z")


def _describe_extensions() -> str:
    return "/".join(DATA_FILE_EXTENSIONS)


def _found(paths: Sequence[str]) -> str:
    return f"; files found: {_sample(paths)}" if paths else "; the repo is empty"


def _sample(paths: Sequence[str], limit: int = 10) -> str:
    shown = ", ".join(paths[:limit])
    return shown + (f" and {len(paths) - limit} more" if len(paths) > limit else "")


def _first_line(error: BaseException) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


# -- downloading ---------------------------------------------------------------------------------


def _download_all(api: HfApi, repo_id: str, commit: str, files: Sequence[str], dest: Path) -> list[Path]:
    """Download ``files`` of ``repo_id`` at ``commit`` into ``dest``, a few at a time."""
    dest.mkdir(parents=True, exist_ok=True)

    def download(filename: str) -> Path:
        local = Path(
            api.hf_hub_download(repo_id, filename, repo_type="dataset", revision=commit, local_dir=dest)
        )
        logger.info("downloaded %s (%d bytes)", filename, local.stat().st_size)
        return local

    workers = max(1, min(_MAX_PARALLEL_DOWNLOADS, len(files)))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="hf-fetch") as pool:
        futures: list[Future[Path]] = [pool.submit(download, filename) for filename in files]
        done, _ = wait(futures, return_when=FIRST_EXCEPTION)
        error = next((f.exception() for f in futures if f in done and f.exception() is not None), None)
        if error is not None:
            for future in futures:
                future.cancel()  # the ones not started yet; the pool waits for those in flight
            raise error
        return [future.result() for future in futures]


def _endpoint_from_environment() -> str | None:
    """``HF_ENDPOINT`` as set now (the client reads it only once, at import); ``None`` means the default."""
    endpoint = os.environ.get("HF_ENDPOINT", "").strip().rstrip("/")
    return endpoint or None


def _describe_endpoint(endpoint: str | None) -> str:
    if endpoint:
        return f"{redact_uri(endpoint)} (HF_ENDPOINT)"
    return f"{constants.ENDPOINT} (the default endpoint; set HF_ENDPOINT to use a mirror)"


@contextmanager
def _hub_errors(uri: DatasetURI, revision: str, endpoint: str | None) -> Iterator[None]:
    """Turn the client's exceptions into :class:`DatasetError` messages that name no credentials."""
    source = f"dataset_name_or_path {uri.redacted()!r}"
    hub = _describe_endpoint(endpoint)
    try:
        yield
    except GatedRepoError as error:
        raise DatasetError(
            f"{source}: dataset {uri.repo_id!r} is gated: accept its conditions on the Hub with an account, "
            f"then set HF_TOKEN to a token of that account ({_token_state(rejected=True)})"
        ) from error
    except RepositoryNotFoundError as error:
        if _status(error) in (401, 403):
            raise DatasetError(_auth_message(source, uri.repo_id, hub)) from error
        raise DatasetError(
            f"{source}: dataset repo {uri.repo_id!r} not found on {hub}; check the name, and if it is private "
            f"set HF_TOKEN to a token that can read it ({_token_state()})"
        ) from error
    except RevisionNotFoundError as error:
        raise DatasetError(
            f"{source}: revision {revision!r} not found in dataset repo {uri.repo_id!r} (branch, tag or commit sha)"
        ) from error
    except RemoteEntryNotFoundError as error:
        raise DatasetError(
            f"{source}: a listed file disappeared from {uri.repo_id!r}@{revision}; retry"
        ) from error
    except HfHubHTTPError as error:
        status = _status(error)
        if status in (401, 403):
            raise DatasetError(_auth_message(source, uri.repo_id, hub, forbidden=status == 403)) from error
        raise DatasetError(f"{source}: the Hub at {hub} answered HTTP {status}") from error
    except OfflineModeIsEnabled as error:
        raise DatasetError(
            f"{source}: HF_HUB_OFFLINE is set, so the Hub cannot be reached; unset it to download hf:// datasets"
        ) from error
    except LocalEntryNotFoundError as error:
        raise DatasetError(f"{source}: could not reach the Hub at {hub} to download a file") from error
    except HFValidationError as error:
        raise DatasetError(
            f"{source}: {uri.repo_id!r} is not a valid Hub repo id ({_first_line(error)})"
        ) from error
    except _transport_errors() as error:
        raise DatasetError(f"{source}: could not reach the Hub at {hub} ({type(error).__name__})") from error


def _auth_message(source: str, repo_id: str, hub: str, forbidden: bool = False) -> str:
    problem = "refused access to" if forbidden else "requires authentication for"
    return (
        f"{source}: the Hub at {hub} {problem} dataset {repo_id!r}: it is private or gated (or does not exist); "
        f"set HF_TOKEN to a token that can read it ({_token_state(rejected=True)})"
    )


def _token_state(rejected: bool = False) -> str:
    """Whether a token is configured (never what it is)."""
    if os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN"):
        return "HF_TOKEN is set but was not accepted" if rejected else "HF_TOKEN is set"
    return "HF_TOKEN is not set"


def _status(error: HfHubHTTPError) -> int | None:
    response = getattr(error, "response", None)
    return getattr(response, "status_code", None)


@cache
def _transport_errors() -> tuple[type[BaseException], ...]:
    """Network-level exceptions of the HTTP library under ``huggingface_hub`` (httpx2, httpx or requests)."""
    errors: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module_name, names in (
        ("httpx2", ("TransportError",)),
        ("httpx", ("TransportError",)),
        ("requests", ("ConnectionError", "Timeout")),
    ):
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        errors.extend(getattr(module, name) for name in names if hasattr(module, name))
    return tuple(errors)


@cache
def _package_version() -> str:
    try:
        return version("kfp-components")
    except PackageNotFoundError:
        return "unknown"
