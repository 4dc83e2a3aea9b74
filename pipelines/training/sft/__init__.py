"""The SFT pipeline (imported lazily, so ``python -m ...sft.pipeline`` runs it only once)."""


def __getattr__(name: str):
    if name == "sft_pipeline":
        from .pipeline import sft_pipeline

        return sft_pipeline
    raise AttributeError(name)
