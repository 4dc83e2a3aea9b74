"""The OSFT fine-tuning pipeline (imported lazily, so ``python -m ...osft.pipeline`` runs it only once)."""


def __getattr__(name: str):
    if name == "osft_pipeline":
        from .pipeline import osft_pipeline

        return osft_pipeline
    raise AttributeError(name)
