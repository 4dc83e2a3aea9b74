"""The rlaif pipeline (imported lazily, so ``python -m ...rlaif.pipeline`` runs it only once)."""


def __getattr__(name: str):
    if name == "rlaif_pipeline":
        from .pipeline import rlaif_pipeline

        return rlaif_pipeline
    raise AttributeError(name)
