"""TrainJob manifests for Kubeflow Trainer v2, in the shape the cluster's CRD serves.

What a TrainJob says
--------------------
``spec.runtimeRef`` names a runtime (by default the ``torch-distributed`` ClusterTrainingRuntime) whose
JobSet template has one replicated job, ``node``, with one container, ``node``. ``spec.trainer`` fills that
container in: ``image``, ``command``, ``args``, ``env``, ``numNodes`` (pods), ``numProcPerNode`` (processes
per pod) and ``resourcesPerNode``.

The torch plugin of the runtime does not wrap the command in ``torchrun``: it only adds the variables
``PET_NNODES``, ``PET_NPROC_PER_NODE``, ``PET_NODE_RANK``, ``PET_MASTER_ADDR`` and ``PET_MASTER_PORT``, which
``torchrun`` reads as the defaults of its own flags (``PET_<FLAG>``). So the command is
``torchrun -m kfp_components.trainer`` with no topology flags, the trainer's options are the args, and the
Trainer webhook refuses a TrainJob whose env sets those variables (we refuse every ``PET_*`` name earlier,
with a clearer message, since any of them would change how torchrun runs).

Two shapes of the CRD
---------------------
Everything the TrainJob adds to the runtime's pod template depends on the Trainer version:

* **v2.0 - v2.1** (:data:`POD_TEMPLATE_OVERRIDES`): ``spec.labels`` / ``spec.annotations`` go to the JobSet
  and its Jobs, and ``spec.podTemplateOverrides`` is a list of ``{targetJobs, metadata, spec}`` merged into
  the pod template of the named replicated jobs (volumes, node selector, tolerations, volume mounts of a
  container, pod labels). ``numProcPerNode`` is an int or ``auto``/``cpu``/``gpu``.
* **v2.2 and later** (:data:`RUNTIME_PATCHES`): ``spec.labels``, ``spec.annotations`` and
  ``spec.podTemplateOverrides`` are gone. ``spec.runtimePatches`` is a list keyed by ``manager`` (who owns
  the patch; Kueue writes its own entry); our entry's ``trainingRuntimeSpec.template`` patches the runtime's
  JobSet template: ``metadata`` (the JobSet's labels and annotations) and, per replicated job, the Job's
  ``metadata`` and the pod ``template`` (its metadata and a subset of the pod spec). ``numProcPerNode`` is an
  integer. Labels and annotations therefore go on the TrainJob's own metadata and, through the patch, on
  the JobSet, the Jobs and the pods. ``spec.activeDeadlineSeconds`` is new: we set it to
  ``timeout_seconds`` so the controller ends the TrainJob even if the launcher is killed outright.

In both shapes the ``node`` container may only receive volume mounts through the override or patch: its env
is ``spec.trainer.env`` (the webhook refuses env for it elsewhere), and its resources are
``resourcesPerNode``.

Where each option goes
----------------------
=====================  =====================================  ==============================================
option                 v2.0 - v2.1                            v2.2 and later
=====================  =====================================  ==============================================
``labels``             TrainJob ``metadata.labels``,          TrainJob ``metadata.labels``, and the patch's
                       ``spec.labels`` (JobSet, Jobs), the    JobSet, Job and pod ``metadata.labels``
                       override's pod ``metadata.labels``
``annotations``        the same places, as annotations        the same places, as annotations
``queue_name``         TrainJob ``metadata.labels`` only      TrainJob ``metadata.labels`` only
``env``, secret_env    ``spec.trainer.env``                   ``spec.trainer.env``
``image_pull_secrets`` the override's ``imagePullSecrets``    the patch's pod ``imagePullSecrets``
``shm_size``           the override's volume ``dshm``,        the patch's volume ``dshm``, mounted at
                       mounted at /dev/shm in ``node``        /dev/shm in container ``node``
``workspace_pvc``      volume ``workspace`` and its mount     volume ``workspace`` and its mount
=====================  =====================================  ==============================================

Kueue reads the LocalQueue from the label ``kueue.x-k8s.io/queue-name`` of the TrainJob itself (its webhook
then sets ``spec.suspend`` until the workload is admitted). The label goes nowhere else: Kueue admits the
TrainJob as one workload, and on the JobSet or the pods the label could have Kueue's JobSet or pod
integration queue them as well, so ``labels`` and ``annotations`` may not carry it.

``/dev/shm``: container runtimes give a container 64 MiB of shared memory, which NCCL (its shared-memory
transport between the GPUs of a node) and PyTorch data loader workers outgrow (``NCCL WARN ... failed to
extend /dev/shm``, ``bus error``). ``shm_size`` mounts a memory-backed emptyDir there. Its default,
``unlimited``, sets no size limit of its own: what /dev/shm holds is memory of the worker, so it is bounded
by the worker's memory limit (``memory``), and a fixed default would be either too small for a node of
8 GPUs or more than a small worker has. Give a size to cap it below that, or ``''`` for no volume (a
runtime that mounts its own /dev/shm, where a second mount would collide).

Names
-----
The JobSet and its pods take the TrainJob's name: pods are ``<trainjob>-node-0-<index>-<5 random>`` and
JobSet refuses a name whose longest pod name would pass 63 characters (RFC 1035). :func:`trainjob_name`
makes short, readable, deterministic names from the pipeline run id and the stage name.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Collection
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import PurePosixPath
from typing import Any, Literal

from kfp_components.typed_config import ConfigError, Options

GROUP = "trainer.kubeflow.org"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
PLURAL = "trainjobs"
CRD_NAME = f"{PLURAL}.{GROUP}"

#: The replicated job and container of the torch runtimes that run the trainer.
TRAINER_JOB = "node"
TRAINER_CONTAINER = "node"
#: The name of the data/model volume in the pod.
WORKSPACE_VOLUME = "workspace"
#: The memory-backed /dev/shm volume of the trainer container.
SHM_VOLUME = "dshm"
SHM_PATH = "/dev/shm"
#: ``shm_size``: a memory-backed /dev/shm with no size limit of its own (the worker's memory bounds it).
SHM_UNLIMITED = "unlimited"
#: What container runtimes (containerd, CRI-O, Docker) give a container as /dev/shm.
RUNTIME_SHM_BYTES = 64 * 2**20

#: Shapes of the TrainJob CRD (see the module docstring).
Shape = Literal["podTemplateOverrides", "runtimePatches"]
POD_TEMPLATE_OVERRIDES: Shape = "podTemplateOverrides"
RUNTIME_PATCHES: Shape = "runtimePatches"

#: The Trainer version assumed when ``trainer_api_version`` is ``auto`` and the CRD cannot be read.
DEFAULT_TRAINER_VERSION = "v2.3"
#: Our entry in ``spec.runtimePatches`` (the list is keyed by manager).
PATCH_MANAGER = "kfp-components/trainjob-launcher"

MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
MANAGED_BY = "kfp-components"
RUN_ID_LABEL = "kfp-components/pipeline-run-id"
STAGE_LABEL = "kfp-components/stage"
SPEC_HASH_ANNOTATION = "kfp-components/spec-hash"
#: The label Kueue reads the LocalQueue from (on the TrainJob).
QUEUE_NAME_LABEL = "kueue.x-k8s.io/queue-name"
#: Labels and annotations the launcher sets itself; the options may not set them.
OWN_LABELS = frozenset({MANAGED_BY_LABEL, RUN_ID_LABEL, STAGE_LABEL})
OWN_ANNOTATIONS = frozenset({SPEC_HASH_ANNOTATION})
#: Most image pull secrets a v2.3 runtime patch takes (its CRD's maxItems).
MAX_IMAGE_PULL_SECRETS = 64

#: Longest name :func:`trainjob_name` makes: room for pod names up to node index 99999.
DEFAULT_NAME_LENGTH = 40
MAX_LABEL_VALUE = 63

#: Flags torchrun takes from the runtime's ``PET_*`` variables; setting them would fight the runtime.
RUNTIME_OWNED_TORCHRUN_FLAGS = (
    "nnodes",
    "nproc-per-node",
    "node-rank",
    "master-addr",
    "master-port",
    "rdzv-endpoint",
    "standalone",
)
#: Substrings of env names that hold secrets; their values must come from a Secret (SecretEnv).
SECRET_NAME_PARTS = ("TOKEN", "SECRET", "PASSWORD", "KEY")
#: Names that contain such a part but are well known not to be secret.
KNOWN_NOT_SECRET = frozenset({"TOKENIZERS_PARALLELISM"})

_RFC1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_RFC1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_LABEL_NAME = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
_ENV_NAME = re.compile(r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")
_QUANTITY = re.compile(
    r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)
_TRAINER_VERSION = re.compile(r"^v2\.(\d+)(\.\d+)?$")


@dataclass(frozen=True)
class SecretEnv:
    """An environment variable of the trainer filled from a Kubernetes Secret, never from a literal value.

    Attributes:
        name: Variable name in the trainer container, e.g. HF_TOKEN.
        secret: Name of the Secret in the TrainJob's namespace.
        key: Key in the Secret.
        optional: Start the pods even when the Secret or the key is missing.
    """

    name: str
    secret: str
    key: str
    optional: bool = False

    def to_env(self) -> dict[str, Any]:
        ref: dict[str, Any] = {"name": self.secret, "key": self.key}
        if self.optional:
            ref["optional"] = True
        return {"name": self.name, "valueFrom": {"secretKeyRef": ref}}


@dataclass
class Toleration(Options):
    """A toleration of the trainer pods (e.g. for tainted GPU nodes).

    Attributes:
        key: Taint key; empty with operator Exists tolerates every taint.
        operator: Equal or Exists.
        value: Taint value (operator Equal).
        effect: NoSchedule, PreferNoSchedule, NoExecute, or empty for all effects.
        toleration_seconds: For NoExecute: how long the pod stays bound after the taint appears.
    """

    key: str = ""
    operator: Literal["Equal", "Exists"] = "Equal"
    value: str = ""
    effect: Literal["", "NoSchedule", "PreferNoSchedule", "NoExecute"] = ""
    toleration_seconds: int | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"operator": self.operator}
        if self.key:
            out["key"] = self.key
        if self.value:
            out["value"] = self.value
        if self.effect:
            out["effect"] = self.effect
        if self.toleration_seconds is not None:
            out["tolerationSeconds"] = self.toleration_seconds
        return out


@dataclass(kw_only=True)
class TrainJobConfig(Options):
    """How to run the training engine as a Kubeflow Trainer TrainJob, and how to wait for it.

    Attributes:
        trainer_image: Trainer image (CUDA PyTorch with this package installed).
        config_path: The trainer's YAML config (a TrainingConfig) as a path inside the pod, usually on the
            mounted volume; passed as ``--config``. With ``resume: true`` in it, a trainer that starts again
            (after a preemption or a pod restart) continues from its newest checkpoint.
        trainer_flags: Trainer options given as flags after the config file, e.g. {learning_rate: 2e-5}.
        name: TrainJob name; empty: made from run_id and stage by trainjob_name.
        run_id: Pipeline run id; names the TrainJob (with stage) and labels it.
        stage: Stage name (sft, osft, dpo, ...); names the TrainJob (with run_id) and labels it.
        namespace: Namespace of the TrainJob; empty: KUBERNETES_NAMESPACE, else the pod's own namespace.
        runtime_name: Training runtime to run on.
        runtime_kind: ClusterTrainingRuntime (cluster-wide) or TrainingRuntime (in the namespace).
        trainer_api_version: Kubeflow Trainer version whose TrainJob shape to send: auto (read the served
            CRD; v2.3 when it cannot be read), or v2.0, v2.1 (podTemplateOverrides), v2.2, v2.3, ...
            (runtimePatches).
        num_nodes: Worker pods.
        gpus_per_node: GPUs per worker; one training process per GPU (one process when 0).
        gpu_resource: Extended resource name of a GPU.
        cpu: CPU request per worker, e.g. "8" (empty: none).
        memory: Memory request and limit per worker, e.g. "64Gi" (empty: none).
        shm_size: /dev/shm of the trainer container, a memory-backed emptyDir (NCCL and data loader workers
            outgrow the container runtime's 64 MiB): unlimited (no size limit of its own; the worker's
            memory limit bounds it), a size of at least 64Mi such as "16Gi" (at most memory), or empty (no
            volume: the runtime's 64 MiB, or the /dev/shm the training runtime mounts itself).
        queue_name: Kueue LocalQueue of the TrainJob (the label kueue.x-k8s.io/queue-name on the TrainJob
            only); empty: not queued by Kueue (unless the cluster's Kueue manages every job).
        image_pull_secrets: Secrets (in the TrainJob's namespace) the kubelet pulls trainer_image with.
        node_selector: Node labels the workers must run on.
        tolerations: Tolerations of the worker pods.
        workspace_pvc: PersistentVolumeClaim with the data and the model (the pipeline's workspace PVC or a
            named claim); empty: no volume.
        workspace_path: Where the claim is mounted in the trainer container.
        env: Plain environment variables of the trainer; names that look secret are refused (use
            secret_env).
        secret_env: Variables filled from Secrets (HF token, S3 keys): only references reach the TrainJob.
        allow_literal_env: Env names allowed as literal values although they look secret.
        labels: Labels of the TrainJob, its JobSet, Jobs and pods (not the Kueue queue: see queue_name).
        annotations: Annotations of the TrainJob, its JobSet, Jobs and pods.
        torchrun_args: Extra torchrun flags (e.g. --max-restarts=2); the topology comes from the runtime.
        timeout_seconds: Give up (and delete the TrainJob) after waiting this long, time spent suspended
            (queued or preempted) included; 0: wait as long as it takes.
        poll_interval_seconds: How often to read the TrainJob's status.
        stream_logs: Copy the trainer's log into this step's log while it runs.
        log_node: Which worker's log to copy (its completion index).
        tail_lines: How many of the last log lines an error quotes.
        delete_on_success: Delete the TrainJob when it completes (it is always deleted on failure).
        on_existing_failed: A rerun finds its TrainJob failed: resubmit (delete it and start again) or fail
            (report its reason and leave it for inspection).
    """

    trainer_image: str
    config_path: str = ""
    trainer_flags: dict[str, Any] = field(default_factory=dict)
    name: str = ""
    run_id: str = ""
    stage: str = ""
    namespace: str = ""
    runtime_name: str = "torch-distributed"
    runtime_kind: Literal["ClusterTrainingRuntime", "TrainingRuntime"] = "ClusterTrainingRuntime"
    trainer_api_version: str = "auto"
    num_nodes: int = 1
    gpus_per_node: int = 1
    gpu_resource: str = "nvidia.com/gpu"
    cpu: str = ""
    memory: str = ""
    shm_size: str = SHM_UNLIMITED
    queue_name: str = ""
    image_pull_secrets: list[str] = field(default_factory=list)
    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: list[Toleration] = field(default_factory=list)
    workspace_pvc: str = ""
    workspace_path: str = "/workspace"
    env: dict[str, str] = field(default_factory=dict)
    secret_env: list[SecretEnv] = field(default_factory=list)
    allow_literal_env: list[str] = field(default_factory=list)
    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)
    torchrun_args: list[str] = field(default_factory=list)
    timeout_seconds: float = 0.0
    poll_interval_seconds: float = 10.0
    stream_logs: bool = True
    log_node: int = 0
    tail_lines: int = 50
    delete_on_success: bool = False
    on_existing_failed: Literal["resubmit", "fail"] = "resubmit"

    def validate(self) -> None:
        """Raise one :class:`ConfigError` listing every bad option, before anything reaches the cluster."""
        problems = self.problems()
        if problems:
            raise ConfigError.of(problems)

    def problems(self) -> list[tuple[str, str]]:
        """Every problem of these options as ``(option, message)``; empty when they are fine."""
        problems: list[tuple[str, str]] = []
        if not self.trainer_image:
            problems.append(("trainer_image", "required option is empty"))
        if not self.config_path and not self.trainer_flags:
            problems.append(("config_path", "give the trainer's config file, trainer_flags, or both"))
        for key, value in self.trainer_flags.items():
            values = value if isinstance(value, list) else [value]
            if not all(isinstance(v, str | int | float | bool) for v in values):
                problems.append((f"trainer_flags.{key}", "must be a scalar or a list of scalars"))
        if self.name:
            limit = max_trainjob_name_length(max(self.num_nodes, 1))
            if not _RFC1035_LABEL.match(self.name) or len(self.name) > limit:
                problems.append(
                    (
                        "name",
                        f"{self.name!r} must be lowercase letters, digits and '-', start with a letter and have "
                        f"at most {limit} characters (its pods are named <name>-node-0-<index>-xxxxx)",
                    )
                )
        elif not (self.run_id and self.stage):
            problems.append(("name", "give name, or run_id and stage to make one from"))
        if not _TRAINER_VERSION.match(self.trainer_api_version) and self.trainer_api_version != "auto":
            problems.append(
                (
                    "trainer_api_version",
                    f"expected auto or a version like v2.1, got {self.trainer_api_version!r}",
                )
            )
        if self.num_nodes < 1:
            problems.append(("num_nodes", f"must be at least 1, got {self.num_nodes}"))
        if self.gpus_per_node < 0:
            problems.append(("gpus_per_node", f"must not be negative, got {self.gpus_per_node}"))
        for name in ("cpu", "memory"):
            value = getattr(self, name)
            if value and not _QUANTITY.match(value):
                problems.append((name, f"{value!r} is not a Kubernetes quantity (e.g. 8, 500m, 64Gi)"))
        problems += self._shm_problems()
        if self.queue_name and (not _RFC1123_LABEL.match(self.queue_name) or len(self.queue_name) > 63):
            problems.append(
                (
                    "queue_name",
                    f"{self.queue_name!r} is not a LocalQueue name: lowercase letters, digits and '-', starting "
                    "and ending with a letter or digit, at most 63 characters",
                )
            )
        problems += _image_pull_secret_problems(self.image_pull_secrets)
        if self.workspace_pvc and not self.workspace_path.startswith("/"):
            problems.append(("workspace_path", f"must be an absolute path, got {self.workspace_path!r}"))
        if self.workspace_pvc and self.shm_size and _same_path(self.workspace_path, SHM_PATH):
            problems.append(("workspace_path", f"{SHM_PATH} is where shm_size mounts shared memory"))
        if self.timeout_seconds < 0:
            problems.append(("timeout_seconds", f"must not be negative, got {self.timeout_seconds}"))
        if self.poll_interval_seconds <= 0:
            problems.append(("poll_interval_seconds", f"must be positive, got {self.poll_interval_seconds}"))
        if not 0 <= self.log_node < max(self.num_nodes, 1):
            problems.append(("log_node", f"must be a worker index below num_nodes={self.num_nodes}"))
        if self.tail_lines < 1:
            problems.append(("tail_lines", f"must be at least 1, got {self.tail_lines}"))
        problems += env_problems(self.env, self.secret_env, allow_literal=self.allow_literal_env)
        for flag in self.torchrun_args:
            option = flag.lstrip("-").split("=", 1)[0].replace("_", "-")
            if flag.startswith("-") and option in RUNTIME_OWNED_TORCHRUN_FLAGS:
                problems.append(
                    ("torchrun_args", f"{flag}: the training runtime sets the topology (PET_* variables)")
                )
        problems += _metadata_problems("labels", self.labels, OWN_LABELS, values_are_labels=True)
        problems += _metadata_problems("annotations", self.annotations, OWN_ANNOTATIONS)
        problems += _metadata_problems("node_selector", self.node_selector, (), values_are_labels=True)
        return problems

    def _shm_problems(self) -> list[tuple[str, str]]:
        if self.shm_size in ("", SHM_UNLIMITED):
            return []
        allowed = (
            f"give a size such as 16Gi, {SHM_UNLIMITED!r} (no size limit of its own; the worker's memory bounds "
            "it) or '' (no /dev/shm volume)"
        )
        size = quantity_bytes(self.shm_size)
        if size is None:
            return [("shm_size", f"{self.shm_size!r} is not a Kubernetes quantity: {allowed}")]
        if size < RUNTIME_SHM_BYTES:
            return [
                (
                    "shm_size",
                    f"{self.shm_size} is less than the 64Mi the container runtime gives without a volume: {allowed}",
                )
            ]
        memory = quantity_bytes(self.memory) if self.memory else None
        if memory is not None and size > memory:
            return [
                (
                    "shm_size",
                    f"{self.shm_size} is more than memory={self.memory}: /dev/shm is memory of the worker, so it "
                    f"can never hold more; give at most {self.memory} or {SHM_UNLIMITED!r}",
                )
            ]
        return []

    @property
    def procs_per_node(self) -> int:
        """``numProcPerNode``: one training process per GPU, one on a CPU-only worker."""
        return max(1, self.gpus_per_node)


def check_env(
    env: dict[str, str], secret_env: list[SecretEnv], *, allow_literal: Collection[str] = ()
) -> None:
    """Refuse env the runtime owns (``PET_*``), literal values of secret-looking names, and duplicates.

    Raises one :class:`ConfigError` listing every problem; it names variables but never their values.
    """
    problems = env_problems(env, secret_env, allow_literal=allow_literal)
    if problems:
        raise ConfigError.of(problems)


def env_problems(
    env: dict[str, str], secret_env: list[SecretEnv], *, allow_literal: Collection[str] = ()
) -> list[tuple[str, str]]:
    """The problems :func:`check_env` raises, as ``(option, message)``."""
    problems: list[tuple[str, str]] = []
    names = list(env) + [s.name for s in secret_env]
    seen: set[str] = set()
    for name in names:
        where = f"env.{name}" if name in env else "secret_env"
        if not _ENV_NAME.match(name):
            problems.append((where, f"{name!r} is not a valid environment variable name"))
        elif name.upper().startswith("PET_"):
            problems.append(
                (
                    where,
                    f"{name}: PET_* variables belong to the training runtime, which sets torchrun's topology "
                    "(PET_NNODES, PET_NPROC_PER_NODE, PET_NODE_RANK, PET_MASTER_ADDR, PET_MASTER_PORT); Kubeflow "
                    "Trainer refuses a TrainJob that sets them. Use num_nodes, gpus_per_node or torchrun_args.",
                )
            )
        elif name in seen:
            problems.append((where, f"{name} is set twice (env and secret_env)"))
        seen.add(name)
    for name in env:
        if looks_secret(name) and name not in allow_literal:
            problems.append(
                (
                    f"env.{name}",
                    "looks like a secret, so it may not be a literal value in the TrainJob: give it as "
                    f"secret_env (SecretEnv(name={name!r}, secret=..., key=...)), or list it in "
                    "allow_literal_env if it is not secret",
                )
            )
    return problems


def quantity_bytes(text: str) -> Decimal | None:
    """The value of a Kubernetes quantity (``64Gi``, ``500M``, ``1e9``, ``0.5Ki``), or None when ``text`` is not
    one. Units: ``Ki Mi Gi Ti Pi Ei`` (powers of 1024), ``n u m k M G T P E`` (powers of 1000), or an exponent."""
    if not _QUANTITY.match(text):
        return None
    match = re.match(r"^([+-]?[0-9.]+)(.*)$", text)
    if match is None:
        return None
    number, suffix = match.groups()
    try:
        value = Decimal(number)
        if suffix in _BINARY_SUFFIXES:
            return value * 1024 ** _BINARY_SUFFIXES[suffix]
        if suffix in _DECIMAL_SUFFIXES:
            return value * Decimal(10) ** _DECIMAL_SUFFIXES[suffix]
        return Decimal(number + suffix)  # no suffix, or an exponent such as e9
    except InvalidOperation:
        return None


_BINARY_SUFFIXES = {"Ki": 1, "Mi": 2, "Gi": 3, "Ti": 4, "Pi": 5, "Ei": 6}
_DECIMAL_SUFFIXES = {"n": -9, "u": -6, "m": -3, "": 0, "k": 3, "M": 6, "G": 9, "T": 12, "P": 15, "E": 18}


def _same_path(a: str, b: str) -> bool:
    return PurePosixPath(a) == PurePosixPath(b)


def _image_pull_secret_problems(names: list[str]) -> list[tuple[str, str]]:
    problems: list[tuple[str, str]] = []
    for index, name in enumerate(names):
        if not isinstance(name, str) or len(name) > 253 or not _DNS_SUBDOMAIN.match(name):
            problems.append(
                (
                    f"image_pull_secrets[{index}]",
                    f"{name!r} is not a Secret name (lowercase letters, digits, '-' and '.', at most 253)",
                )
            )
        elif name in names[:index]:
            problems.append((f"image_pull_secrets[{index}]", f"{name} is listed twice"))
    if len(names) > MAX_IMAGE_PULL_SECRETS:
        problems.append(("image_pull_secrets", f"at most {MAX_IMAGE_PULL_SECRETS}, got {len(names)}"))
    return problems


def _metadata_problems(
    where: str, values: dict[str, str], reserved: Collection[str], *, values_are_labels: bool = False
) -> list[tuple[str, str]]:
    """Problems of a label or annotation mapping: keys as Kubernetes checks them, label values, and keys
    that the launcher or Kueue own."""
    problems: list[tuple[str, str]] = []
    for key, value in values.items():
        path = f"{where}.{key}"
        key_problem = _metadata_key_problem(key)
        if key_problem:
            problems.append((path, key_problem))
        elif key in reserved:
            problems.append((path, "is set by the launcher itself"))
        elif key == QUEUE_NAME_LABEL and where in ("labels", "annotations"):  # older Kueue read either
            problems.append(
                (
                    path,
                    "give the Kueue queue as queue_name: it labels the TrainJob only (on the JobSet or the pods "
                    "the label could have Kueue queue them as well)",
                )
            )
        if values_are_labels and (
            not isinstance(value, str) or not _LABEL_VALUE.match(value) or len(value) > MAX_LABEL_VALUE
        ):
            problems.append((path, f"{value!r} is not a valid label value"))
    return problems


def _metadata_key_problem(key: str) -> str:
    """Why ``key`` is not a valid label or annotation key (``[prefix/]name``), or ``''``."""
    prefix, slash, name = key.rpartition("/")
    if slash and (not prefix or len(prefix) > 253 or not _DNS_SUBDOMAIN.match(prefix)):
        return f"{key!r}: the prefix before '/' must be a DNS subdomain (e.g. example.com)"
    if not name or len(name) > 63 or not _LABEL_NAME.match(name):
        return (
            f"{key!r} is not a valid key: at most 63 letters, digits, '-', '_' and '.' (after an optional "
            "prefix/), starting and ending with a letter or digit"
        )
    return ""


def looks_secret(name: str) -> bool:
    """Whether an env name suggests a secret value (``*TOKEN*``, ``*SECRET*``, ``*PASSWORD*``, ``*KEY*``)."""
    upper = name.upper()
    return upper not in KNOWN_NOT_SECRET and any(part in upper for part in SECRET_NAME_PARTS)


# ----------------------------------------------------------------------------------------------- names


def max_trainjob_name_length(num_nodes: int = 1) -> int:
    """Longest TrainJob name whose longest pod name, ``<name>-node-0-<num_nodes-1>-xxxxx``, fits 63."""
    return 63 - len(f"-{TRAINER_JOB}-0-{num_nodes - 1}-xxxxx")


def trainjob_name(run_id: str, stage: str, *, max_length: int = DEFAULT_NAME_LENGTH) -> str:
    """A TrainJob name from a pipeline run id and a stage name: readable, deterministic, RFC 1035.

    ``<stage>-<run id>`` in lowercase with other characters turned into ``-``, prefixed with ``tj-`` when it
    would not start with a letter; when longer than ``max_length`` it is cut and ends with ``-`` and 8 hex
    digits of a hash of the full (run id, stage), so names stay distinct.
    """
    if max_length < 12:
        raise ValueError(f"max_length must be at least 12, got {max_length}")
    base = _dns_label_text(f"{stage}-{run_id}")
    if not base or not base[0].isalpha():
        base = f"tj-{base}".rstrip("-")
    if len(base) <= max_length:
        return base
    digest = hashlib.sha256(f"{run_id}\0{stage}".encode()).hexdigest()[:8]
    return f"{base[: max_length - 9].rstrip('-')}-{digest}"


def label_value(text: str) -> str:
    """``text`` as a label value: at most 63 of ``[A-Za-z0-9._-]``, alphanumeric at both ends; a cut value
    ends with a hash of the full text."""
    value = re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-._")
    if len(value) <= MAX_LABEL_VALUE:
        return value
    digest = hashlib.sha256(text.encode()).hexdigest()[:8]
    return f"{value[: MAX_LABEL_VALUE - 9].rstrip('-._')}-{digest}"


def _dns_label_text(text: str) -> str:
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]", "-", text.lower())).strip("-")


# ------------------------------------------------------------------------------------------- versions


def shape_for_version(version: str) -> Shape:
    """The CRD shape of a Trainer version: v2.0 and v2.1 use podTemplateOverrides, v2.2+ runtimePatches."""
    match = _TRAINER_VERSION.match(version)
    if not match:
        raise ValueError(f"not a Kubeflow Trainer v2 version: {version!r}")
    return POD_TEMPLATE_OVERRIDES if int(match.group(1)) <= 1 else RUNTIME_PATCHES


def shape_from_crd(crd: dict[str, Any]) -> Shape | None:
    """The shape the served TrainJob CRD accepts, from the fields of its ``v1alpha1`` schema's spec."""
    for version in crd.get("spec", {}).get("versions", []):
        if version.get("name") != VERSION or not version.get("served", False):
            continue
        schema = version.get("schema", {}).get("openAPIV3Schema", {})
        spec_fields = schema.get("properties", {}).get("spec", {}).get("properties", {})
        if RUNTIME_PATCHES in spec_fields:
            return RUNTIME_PATCHES
        if POD_TEMPLATE_OVERRIDES in spec_fields:
            return POD_TEMPLATE_OVERRIDES
    return None


# ------------------------------------------------------------------------------------------- manifest


def trainer_command(config: TrainJobConfig) -> tuple[list[str], list[str]]:
    """The trainer container's command and args: ``torchrun [torchrun_args] -m kfp_components.trainer``
    and ``--config <path> [--flag value ...]`` (no topology flags: torchrun reads the runtime's PET_*)."""
    command = ["torchrun", *config.torchrun_args, "-m", "kfp_components.trainer"]
    args: list[str] = ["--config", config.config_path] if config.config_path else []
    for key, value in config.trainer_flags.items():
        values = value if isinstance(value, list | tuple) else [value]
        args += [f"--{key}", *(_flag_text(v) for v in values)]
    return command, args


def _flag_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def build_trainjob(config: TrainJobConfig, *, name: str, namespace: str, shape: Shape) -> dict[str, Any]:
    """The TrainJob for ``config`` in the given CRD shape (see the module docstring for where each option
    goes). Pure: no cluster access.

    The TrainJob's metadata carries our labels (managed-by, run id, stage), the Kueue queue, and a hash of
    its spec and labels, so a rerun can tell its own TrainJob from a stranger's of the same name.
    """
    labels = {**config.labels, **_own_labels(config)}
    command, args = trainer_command(config)
    env = [{"name": k, "value": v} for k, v in config.env.items()] + [s.to_env() for s in config.secret_env]
    env_names = {e["name"] for e in env}
    if "PYTHONUNBUFFERED" not in env_names:  # the trainer's lines reach the pod log (and ours) at once
        env.append({"name": "PYTHONUNBUFFERED", "value": "1"})
    trainer: dict[str, Any] = {
        "image": config.trainer_image,
        "command": command,
        "args": args,
        "env": env,
        "numNodes": config.num_nodes,
        "numProcPerNode": config.procs_per_node,
    }
    resources = _resources(config)
    if resources:
        trainer["resourcesPerNode"] = resources
    spec: dict[str, Any] = {
        "runtimeRef": {"apiGroup": GROUP, "kind": config.runtime_kind, "name": config.runtime_name},
        "trainer": trainer,
    }
    pod_spec = _pod_spec(config)
    pod_metadata = _metadata(labels, config.annotations)
    if shape == POD_TEMPLATE_OVERRIDES:
        spec["labels"] = labels
        if config.annotations:
            spec["annotations"] = dict(config.annotations)
        override: dict[str, Any] = {"targetJobs": [{"name": TRAINER_JOB}], "metadata": pod_metadata}
        if pod_spec:
            override["spec"] = pod_spec
        spec["podTemplateOverrides"] = [override]
    elif shape == RUNTIME_PATCHES:
        if config.timeout_seconds:  # the controller stops it even if this launcher is killed outright
            spec["activeDeadlineSeconds"] = math.ceil(config.timeout_seconds)
        pod_template: dict[str, Any] = {"metadata": pod_metadata}
        if pod_spec:
            pod_template["spec"] = pod_spec
        spec["runtimePatches"] = [
            {
                "manager": PATCH_MANAGER,
                "trainingRuntimeSpec": {
                    "template": {
                        "metadata": _metadata(labels, config.annotations),
                        "spec": {
                            "replicatedJobs": [
                                {
                                    "name": TRAINER_JOB,
                                    "template": {
                                        "metadata": _metadata(labels, config.annotations),
                                        "spec": {"template": pod_template},
                                    },
                                }
                            ]
                        },
                    }
                },
            }
        ]
    else:
        raise ValueError(f"unknown TrainJob shape {shape!r}")
    trainjob_labels = dict(labels)
    if config.queue_name:  # Kueue reads it here; nowhere else (see the module docstring)
        trainjob_labels[QUEUE_NAME_LABEL] = config.queue_name
    annotations = {**config.annotations, SPEC_HASH_ANNOTATION: spec_hash(spec, trainjob_labels)}
    return {
        "apiVersion": API_VERSION,
        "kind": "TrainJob",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": trainjob_labels,
            "annotations": annotations,
        },
        "spec": spec,
    }


def spec_hash(spec: dict[str, Any], labels: dict[str, str] | None = None) -> str:
    """A short, stable hash of a TrainJob's spec and labels (recorded in an annotation when created)."""
    what = {"spec": spec, "labels": labels or {}}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


def _own_labels(config: TrainJobConfig) -> dict[str, str]:
    labels = {MANAGED_BY_LABEL: MANAGED_BY}
    if config.run_id:
        labels[RUN_ID_LABEL] = label_value(config.run_id)
    if config.stage:
        labels[STAGE_LABEL] = label_value(config.stage)
    return labels


def _metadata(labels: dict[str, str], annotations: dict[str, str]) -> dict[str, Any]:
    metadata: dict[str, Any] = {"labels": dict(labels)}
    if annotations:
        metadata["annotations"] = dict(annotations)
    return metadata


def _resources(config: TrainJobConfig) -> dict[str, dict[str, str]]:
    requests: dict[str, str] = {}
    limits: dict[str, str] = {}
    if config.cpu:
        requests["cpu"] = config.cpu
    if config.memory:
        requests["memory"] = limits["memory"] = config.memory
    if config.gpus_per_node:
        requests[config.gpu_resource] = limits[config.gpu_resource] = str(config.gpus_per_node)
    resources = {}
    if requests:
        resources["requests"] = requests
    if limits:
        resources["limits"] = limits
    return resources


def _pod_spec(config: TrainJobConfig) -> dict[str, Any]:
    """What the TrainJob adds to the runtime's pod spec: node selector, tolerations, image pull secrets, the
    workspace volume and /dev/shm, with their mounts in the trainer container."""
    spec: dict[str, Any] = {}
    if config.node_selector:
        spec["nodeSelector"] = dict(config.node_selector)
    if config.tolerations:
        spec["tolerations"] = [t.to_dict() for t in config.tolerations]
    if config.image_pull_secrets:
        spec["imagePullSecrets"] = [{"name": name} for name in config.image_pull_secrets]
    volumes: list[dict[str, Any]] = []
    mounts: list[dict[str, Any]] = []
    if config.workspace_pvc:
        volumes.append(
            {"name": WORKSPACE_VOLUME, "persistentVolumeClaim": {"claimName": config.workspace_pvc}}
        )
        mounts.append({"name": WORKSPACE_VOLUME, "mountPath": config.workspace_path})
    if config.shm_size:
        empty_dir = {"medium": "Memory"}
        if config.shm_size != SHM_UNLIMITED:
            empty_dir["sizeLimit"] = config.shm_size
        volumes.append({"name": SHM_VOLUME, "emptyDir": empty_dir})
        mounts.append({"name": SHM_VOLUME, "mountPath": SHM_PATH})
    if volumes:
        spec["volumes"] = volumes
        spec["containers"] = [{"name": TRAINER_CONTAINER, "volumeMounts": mounts}]
    return spec
