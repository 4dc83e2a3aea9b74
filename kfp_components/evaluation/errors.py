"""The errors of the evaluation step; each message says what is wrong, where, and what to do."""


class EvaluationError(RuntimeError):
    """The evaluation cannot run; the message says why and what to do."""


class UnknownTaskError(EvaluationError, ValueError):
    """A task name is not known to lm-eval nor found on the include path."""


class TaskDataError(EvaluationError):
    """A task's data could not be downloaded or read."""


class ModelNotFoundError(EvaluationError, ValueError):
    """A model to evaluate is missing or unreadable; the message names the option that gave it."""
