"""The DPO pipeline (imported lazily, so ``python -m ...dpo.pipeline`` runs it only once)."""


def __getattr__(name: str):
    if name == "dpo_pipeline":
        from .pipeline import dpo_pipeline

        return dpo_pipeline
    raise AttributeError(name)
