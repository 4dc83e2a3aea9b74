"""The rl pipeline (imported lazily, so ``python -m ...rl.pipeline`` runs it only once)."""


def __getattr__(name: str):
    if name == "rl_pipeline":
        from .pipeline import rl_pipeline

        return rl_pipeline
    raise AttributeError(name)
