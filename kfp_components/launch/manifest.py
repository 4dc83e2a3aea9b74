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

#: Shapes of the TrainJob CRD (see the module docstring).
POD_TEMPLATE_OVERRIDES = "podTemplateOverrides"
RUNTIME_PATCHES = "runtimePatches"
Shape = Literal["podTemplateOverrides", "runtimePatches"]

#: The Trainer version assumed when ``trainer_api_version`` is ``auto`` and the CRD cannot be read.
DEFAULT_TRAINER_VERSION = "v2.3"
#: Our entry in ``spec.runtimePatches`` (the list is keyed by manager).
PATCH_MANAGER = "kfp-components/trainjob-launcher"

MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
MANAGED_BY = "kfp-components"
RUN_ID_LABEL = "kfp-components/pipeline-run-id"
STAGE_LABEL = "kfp-components/stage"
SPEC_HASH_ANNOTATION = "kfp-components/spec-hash"

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
            mounted volume; passed as ``--config``.
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
        node_selector: Node labels the workers must run on.
        tolerations: Tolerations of the worker pods.
        workspace_pvc: PersistentVolumeClaim with the data and the model (the pipeline's workspace PVC or a
            named claim); empty: no volume.
        workspace_path: Where the claim is mounted in the trainer container.
        env: Plain environment variables of the trainer; names that look secret are refused (use
            secret_env).
        secret_env: Variables filled from Secrets (HF token, S3 keys): only references reach the TrainJob.
        allow_literal_env: Env names allowed as literal values although they look secret.
        labels: Labels of the TrainJob, its JobSet, Jobs and pods.
        annotations: Annotations of the TrainJob, its JobSet, Jobs and pods.
        torchrun_args: Extra torchrun flags (e.g. --max-restarts=2); the topology comes from the runtime.
        timeout_seconds: Give up (and delete the TrainJob) after waiting this long, suspended time included;
            0: wait as long as it takes.
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
        """Raise :class:`ConfigError` naming the first bad option, before anything reaches the cluster."""
        if not self.trainer_image:
            raise ConfigError("trainer_image", "required option is empty")
        if not self.config_path and not self.trainer_flags:
            raise ConfigError("config_path", "give the trainer's config file, trainer_flags, or both")
        for key, value in self.trainer_flags.items():
            values = value if isinstance(value, list) else [value]
            if not all(isinstance(v, str | int | float | bool) for v in values):
                raise ConfigError(f"trainer_flags.{key}", "must be a scalar or a list of scalars")
        if self.name:
            limit = max_trainjob_name_length(self.num_nodes)
            if not _RFC1035_LABEL.match(self.name) or len(self.name) > limit:
                raise ConfigError(
                    "name",
                    f"{self.name!r} must be lowercase letters, digits and '-', start with a letter and have at "
                    f"most {limit} characters (its pods are named <name>-node-0-<index>-xxxxx)",
                )
        elif not (self.run_id and self.stage):
            raise ConfigError("name", "give name, or run_id and stage to make one from")
        if not _TRAINER_VERSION.match(self.trainer_api_version) and self.trainer_api_version != "auto":
            raise ConfigError(
                "trainer_api_version",
                f"expected auto or a version like v2.1, got {self.trainer_api_version!r}",
            )
        if self.num_nodes < 1:
            raise ConfigError("num_nodes", f"must be at least 1, got {self.num_nodes}")
        if self.gpus_per_node < 0:
            raise ConfigError("gpus_per_node", f"must not be negative, got {self.gpus_per_node}")
        for name in ("cpu", "memory"):
            value = getattr(self, name)
            if value and not _QUANTITY.match(value):
                raise ConfigError(name, f"{value!r} is not a Kubernetes quantity (e.g. 8, 500m, 64Gi)")
        if self.workspace_pvc and not self.workspace_path.startswith("/"):
            raise ConfigError("workspace_path", f"must be an absolute path, got {self.workspace_path!r}")
        if self.timeout_seconds < 0:
            raise ConfigError("timeout_seconds", f"must not be negative, got {self.timeout_seconds}")
        if self.poll_interval_seconds <= 0:
            raise ConfigError("poll_interval_seconds", f"must be positive, got {self.poll_interval_seconds}")
        if not 0 <= self.log_node < self.num_nodes:
            raise ConfigError("log_node", f"must be a worker index below num_nodes={self.num_nodes}")
        if self.tail_lines < 1:
            raise ConfigError("tail_lines", f"must be at least 1, got {self.tail_lines}")
        check_env(self.env, self.secret_env, allow_literal=self.allow_literal_env)
        for flag in self.torchrun_args:
            option = flag.lstrip("-").split("=", 1)[0].replace("_", "-")
            if flag.startswith("-") and option in RUNTIME_OWNED_TORCHRUN_FLAGS:
                raise ConfigError(
                    "torchrun_args", f"{flag}: the training runtime sets the topology (PET_* variables)"
                )
        for where, values in (("labels", self.labels), ("node_selector", self.node_selector)):
            for key, value in values.items():
                if not _LABEL_VALUE.match(value) or len(value) > MAX_LABEL_VALUE:
                    raise ConfigError(f"{where}.{key}", f"{value!r} is not a valid label value")

    @property
    def procs_per_node(self) -> int:
        """``numProcPerNode``: one training process per GPU, one on a CPU-only worker."""
        return max(1, self.gpus_per_node)


def check_env(
    env: dict[str, str], secret_env: list[SecretEnv], *, allow_literal: Collection[str] = ()
) -> None:
    """Refuse env the runtime owns (``PET_*``), literal values of secret-looking names, and duplicates.

    The error names the variable but never its value.
    """
    names = list(env) + [s.name for s in secret_env]
    seen: set[str] = set()
    for name in names:
        where = f"env.{name}" if name in env else "secret_env"
        if not _ENV_NAME.match(name):
            raise ConfigError(where, f"{name!r} is not a valid environment variable name")
        if name.upper().startswith("PET_"):
            raise ConfigError(
                where,
                f"{name}: PET_* variables belong to the training runtime, which sets torchrun's topology "
                "(PET_NNODES, PET_NPROC_PER_NODE, PET_NODE_RANK, PET_MASTER_ADDR, PET_MASTER_PORT); Kubeflow "
                "Trainer refuses a TrainJob that sets them. Use num_nodes, gpus_per_node or torchrun_args.",
            )
        if name in seen:
            raise ConfigError(where, f"{name} is set twice (env and secret_env)")
        seen.add(name)
    for name in env:
        if looks_secret(name) and name not in allow_literal:
            raise ConfigError(
                f"env.{name}",
                "looks like a secret, so it may not be a literal value in the TrainJob: give it as "
                f"secret_env (SecretEnv(name={name!r}, secret=..., key=...)), or list it in allow_literal_env "
                "if it is not secret",
            )


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
    """The TrainJob for ``config`` in the given CRD shape. Pure: no cluster access.

    The TrainJob's metadata carries our labels (managed-by, run id, stage) and a hash of its spec, so a
    rerun can tell its own TrainJob from a stranger's of the same name.
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
    annotations = {**config.annotations, SPEC_HASH_ANNOTATION: spec_hash(spec)}
    return {
        "apiVersion": API_VERSION,
        "kind": "TrainJob",
        "metadata": {"name": name, "namespace": namespace, "labels": labels, "annotations": annotations},
        "spec": spec,
    }


def spec_hash(spec: dict[str, Any]) -> str:
    """A short, stable hash of a TrainJob spec (recorded in an annotation when created)."""
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


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
    """What the TrainJob adds to the runtime's pod spec: node selector, tolerations, the volume."""
    spec: dict[str, Any] = {}
    if config.node_selector:
        spec["nodeSelector"] = dict(config.node_selector)
    if config.tolerations:
        spec["tolerations"] = [t.to_dict() for t in config.tolerations]
    if config.workspace_pvc:
        spec["volumes"] = [
            {"name": WORKSPACE_VOLUME, "persistentVolumeClaim": {"claimName": config.workspace_pvc}}
        ]
        spec["containers"] = [
            {
                "name": TRAINER_CONTAINER,
                "volumeMounts": [{"name": WORKSPACE_VOLUME, "mountPath": config.workspace_path}],
            }
        ]
    return spec
