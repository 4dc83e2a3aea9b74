"""The cot_distillation pipeline (imported lazily, so ``python -m ...cot_distillation.pipeline`` runs it only once)."""


def __getattr__(name: str):
    if name == "cot_distillation_pipeline":
        from .pipeline import cot_distillation_pipeline

        return cot_distillation_pipeline
    raise AttributeError(name)
