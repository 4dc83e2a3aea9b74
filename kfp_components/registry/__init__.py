"""Model Registry registration and provenance for fine-tuned models.

* :class:`RegistryConfig`: where and how to register (read through ``typed_config.from_dict``).
* :func:`build_provenance`, :func:`write_provenance`: ``provenance.json`` and ``model_card.md`` beside the model.
* :func:`register_model`: register a version with the official ``model_registry`` client.
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
from kfp_components.registry.config import RegistryConfig, check_storage_uri
from kfp_components.registry.provenance import (
    MODEL_CARD_FILE,
    PROVENANCE_FILE,
    build_provenance,
    model_card,
    to_custom_properties,
    write_provenance,
)

__all__ = [
    "MODEL_CARD_FILE",
    "PROVENANCE_FILE",
    "RegistrationResult",
    "RegistryAuthError",
    "RegistryConfig",
    "RegistryError",
    "RegistryUnavailableError",
    "VersionExistsError",
    "build_provenance",
    "check_storage_uri",
    "derive_version_name",
    "model_card",
    "register_model",
    "to_custom_properties",
    "write_provenance",
]
