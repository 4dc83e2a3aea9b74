"""The import paths of the FNSFT multi-stage fine-tuning package, served by kfp-components.

Users' custom stages are written against ``fnsft.stages.base`` and registered through ``fnsft.pipeline``
(as in the modular fine-tuning guide); these modules are the very classes of
:mod:`kfp_components.stages` and :mod:`kfp_components.orchestration`, not copies, so a stage written either
way runs in the same pipeline.
"""
