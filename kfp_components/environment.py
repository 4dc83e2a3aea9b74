"""Writable cache folders for a process that runs as an arbitrary non-root user.

OpenShift's restricted policy runs a pod as a random UID (in group 0) whose HOME may be ``/`` or read-only,
and Kubernetes pods often run with a read-only HOME too. The libraries this package drives then fail on
their first cache write (Hugging Face models and datasets, Triton and TorchInductor kernels, matplotlib's
config, ...). :func:`ensure_writable_caches`, called first at every front door (the trainer and pipeline
CLIs, each KFP component body, the demo), points each cache whose location this process cannot write to a
folder under ``TMPDIR`` and logs once what it changed. A variable already set to a writable place is never
touched, and neither is a cache whose default location is writable; child processes (torchrun workers,
``kfp.local`` steps) inherit the result.

It changes environment variables only, so it must run before the libraries read them: ``huggingface_hub``,
``datasets`` and ``lm_eval`` read theirs when first imported.
"""

from __future__ import annotations

import getpass
import importlib.util
import logging
import os
import tempfile
from collections.abc import Callable, Mapping, MutableMapping
from pathlib import Path

log = logging.getLogger(__name__)

#: The folder under the temporary directory that takes the caches this process could not write.
FOLDER_PREFIX = "kfp-components-"

#: What a default returns for a library that is not installed: nothing to point anywhere.
NOT_INSTALLED = "-"
_logged = False


def _home(env: Mapping[str, str]) -> str:
    return env.get("HOME", "")


def _under(base: str, *parts: str) -> str:
    return os.path.join(base, *parts) if base else ""


def _xdg_cache(env: Mapping[str, str]) -> str:
    return env.get("XDG_CACHE_HOME") or _under(_home(env), ".cache")


def _xdg_config(env: Mapping[str, str]) -> str:
    return env.get("XDG_CONFIG_HOME") or _under(_home(env), ".config")


def _hf_home(env: Mapping[str, str]) -> str:
    return env.get("HF_HOME") or _under(_xdg_cache(env), "huggingface")


def _inductor_default(env: Mapping[str, str]) -> str:
    try:
        user = getpass.getuser()  # a random UID has no passwd entry and often no USER variable
        return os.path.join(tempfile.gettempdir(), f"torchinductor_{user}")
    except (KeyError, OSError):  # no user name, or no writable temporary folder
        return ""


def _lm_eval_default(env: Mapping[str, str]) -> str:
    spec = importlib.util.find_spec("lm_eval")  # finds the package without importing it
    if spec is None or not spec.origin:
        return NOT_INSTALLED
    return os.path.join(os.path.dirname(spec.origin), "caching", ".cache")


#: Each cache variable, where its owner writes when it is unset, and the folder it gets instead. Listed
#: parents first. Variables that only matter when set (their default follows a parent) have no default.
CACHES: tuple[tuple[str, Callable[[Mapping[str, str]], str] | None, str], ...] = (
    ("XDG_CACHE_HOME", lambda env: _under(_home(env), ".cache"), "cache"),
    ("HF_HOME", lambda env: _under(_xdg_cache(env), "huggingface"), "huggingface"),
    ("HF_HUB_CACHE", None, "huggingface/hub"),
    ("HUGGINGFACE_HUB_CACHE", None, "huggingface/hub"),
    ("HF_DATASETS_CACHE", None, "huggingface/datasets"),
    ("HF_ASSETS_CACHE", None, "huggingface/assets"),
    ("HF_XET_CACHE", None, "huggingface/xet"),
    ("HF_MODULES_CACHE", None, "huggingface/modules"),
    ("TRANSFORMERS_CACHE", None, "huggingface/hub"),
    ("TORCH_HOME", lambda env: _under(_xdg_cache(env), "torch"), "torch"),
    ("TORCH_EXTENSIONS_DIR", lambda env: _under(_xdg_cache(env), "torch_extensions"), "torch_extensions"),
    ("TORCHINDUCTOR_CACHE_DIR", _inductor_default, "torchinductor"),
    ("TRITON_HOME", _home, "triton-home"),
    (
        "TRITON_CACHE_DIR",
        lambda env: _under(env.get("TRITON_HOME") or _home(env), ".triton", "cache"),
        "triton",
    ),
    ("CUDA_CACHE_PATH", lambda env: _under(_home(env), ".nv", "ComputeCache"), "nv-compute-cache"),
    ("MPLCONFIGDIR", lambda env: _under(_xdg_config(env), "matplotlib"), "matplotlib"),
    ("VLLM_CACHE_ROOT", lambda env: _under(_xdg_cache(env), "vllm"), "vllm"),
    ("LM_HARNESS_CACHE_PATH", _lm_eval_default, "lm-eval"),
    ("KFP_COMPONENTS_CACHE", lambda env: _under(_home(env), ".cache", "kfp_components"), "kfp_components"),
)


def is_writable_dir(path: str) -> bool:
    """Whether this process can create files in ``path``, or create ``path`` itself (its nearest existing
    parent is a writable folder). An empty or relative path (an unset HOME) is not writable."""
    if not path or not os.path.isabs(path):
        return False
    current = Path(path)
    while not current.exists():
        if current.parent == current:
            return False
        current = current.parent
    return current.is_dir() and os.access(current, os.W_OK | os.X_OK)


def ensure_writable_caches(environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Point every cache variable whose location is not writable to a folder under ``TMPDIR``.

    A variable set to a writable folder is kept; an unset one whose default location is writable stays
    unset. ``environ`` defaults to ``os.environ``. Returns the variables changed (name -> new folder) and
    logs them, once per process.
    """
    env = os.environ if environ is None else environ
    original = dict(env)
    unwritable: list[tuple[str, str, str, str]] = []  # name, value, location, folder
    for name, default, folder in CACHES:
        current = original.get(name, "")
        if current:
            location = os.path.abspath(os.path.expanduser(current))
        elif default is None:
            continue  # unset: it follows its parent, which is writable by now
        else:
            location = default(original)
            if location == NOT_INSTALLED:
                continue
        if not is_writable_dir(location):
            unwritable.append((name, current, location, folder))
    if not unwritable:
        return {}
    try:
        base = os.path.join(tempfile.gettempdir(), f"{FOLDER_PREFIX}{os.getuid()}")
    except FileNotFoundError:  # no writable temporary folder either (a read-only root filesystem)
        log.warning(
            "%s: not writable, and no writable temporary folder to move them to; set TMPDIR to a writable "
            "volume (an emptyDir)",
            ", ".join(name for name, *_ in unwritable),
        )
        return {}
    changed: dict[str, str] = {}
    reasons: list[str] = []
    for name, current, location, folder in unwritable:
        env[name] = changed[name] = os.path.join(base, folder)
        if current:
            was = f"{current} is not writable"
        elif location:
            was = f"unset; {location} is not writable"
        else:
            was = "unset; no HOME or user name to default to"
        reasons.append(f"{name}={changed[name]} ({was})")
    global _logged
    if changed and not _logged:
        _logged = True
        if original.get("RANK", "0") == "0":  # one line per job, not one per torchrun worker
            log.info("caches moved to writable folders (uid %d): %s", os.getuid(), "; ".join(reasons))
    return changed
