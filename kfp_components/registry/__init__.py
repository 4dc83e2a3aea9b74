"""Model Registry registration and provenance for fine-tuned models.

* :class:`RegistryConfig`: where and how to register (read through ``typed_config.from_dict``).
* :func:`build_provenance`, :func:`write_provenance`: ``provenance.json`` and ``model_card.md`` beside the model.
* :func:`register_model`: register a version with the official ``model_registry`` client.
* :func:`model_storage`: the storage URI (``minio://``, ``s3://``, ...) as the registry and serving read it.
"""

from kfp_components.registry.client import (
    RegistrationResult,
    RegistryAuthError,
    RegistryError,
    RegistryUnavailableError,
    VersionExistsError,
    derive_version_name,
    register_model,
)
from kfp_components.registry.config import RegistryConfig
from kfp_components.registry.provenance import (
    MODEL_CARD_FILE,
    PROVENANCE_FILE,
    build_provenance,
    model_card,
    to_custom_properties,
    write_provenance,
)
from kfp_components.registry.storage import DEFAULT_MINIO_ENDPOINT, ModelStorage, model_storage

__all__ = [
    "DEFAULT_MINIO_ENDPOINT",
    "MODEL_CARD_FILE",
    "PROVENANCE_FILE",
    "ModelStorage",
    "RegistrationResult",
    "RegistryAuthError",
    "RegistryConfig",
    "RegistryError",
    "RegistryUnavailableError",
    "VersionExistsError",
    "build_provenance",
    "derive_version_name",
    "model_card",
    "model_storage",
    "register_model",
    "to_custom_properties",
    "write_provenance",
]
