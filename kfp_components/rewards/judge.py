"""The shipped ``judge`` reward: a judge LLM's pointwise score of each completion (direct RLAIF).

``{function: judge, backend: openai, base_url: ..., model: ..., token_env: ...}`` (every option of
:class:`~kfp_components.feedback.judges.JudgeOptions`, plus ``name``). The score is on the judge's scale
(``score_min`` to ``score_max``); a reply without a score is None for that completion (left out of the
baselines and counted in ``reward/<name>/none_share`` and ``reward/<name>/unscored``). A batch in which the
judge scored nothing stops the run: the judge or its template is broken, and an update from no reward would
only waste the step (checked by the engine over every rank's completions, and on the first row by the dry run). Endpoint failures beyond the retries or the request budget stop the run with the
endpoint's last answer.

The judge's counters (requests, cache hits, unscored replies, tokens, seconds) reach the step metrics through
``usage()`` as ``reward/<name>/<counter>``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from kfp_components.feedback.judges import JudgeOptions, PointwiseJudge, build_backend
from kfp_components.rewards.errors import RewardError
from kfp_components.typed_config import ConfigError


@dataclass
class JudgeRewardOptions(JudgeOptions):
    """Options of the shipped ``judge`` reward: the judge's (see JudgeOptions) and

    Attributes:
        function: ``judge``.
        name: Name in metrics; default ``judge``.
    """

    function: Literal["judge"] = "judge"
    name: str = ""


class JudgeReward:
    """Scores completions with a pointwise judge (see the module docstring)."""

    def __init__(self, options: JudgeRewardOptions, device: str = "cpu"):
        self.options = options
        self.where = f"judge {options.describe()}"
        self.judge = PointwiseJudge(options, build_backend(options, device=device))

    def __repr__(self) -> str:
        return f"JudgeReward({self.where})"

    def __call__(
        self, prompts: Sequence[Any], completions: Sequence[str], **columns: Any
    ) -> list[float | None]:
        from kfp_components.feedback.endpoint import FeedbackError

        try:
            scores = self.judge.score(prompts, completions, columns)
        except FeedbackError as exc:
            raise RewardError(self.where, str(exc)) from None
        except ConfigError as exc:  # a placeholder the rows do not have
            raise RewardError(self.where, str(exc)) from None
        return scores

    #: The engine stops a step in which this reward scored no completion at all (over every rank), and the
    #: dry run when it does not score the first row: a judge that never answers with a number is broken.
    stop_when_unscored = True

    def unscored_message(self, count: int) -> str:
        """Why ``count`` completions got no score, for the error that stops the run."""
        return (
            f"gave no score to any of the {count} completion(s); its last reply was "
            f"{self.judge.counts.last_unscored_reply!r}. Check prompt_template (it should ask for a number "
            f"from {self.options.score_min:g} to {self.options.score_max:g}) and score_pattern "
            f"({self.options.score_pattern!r})"
        )

    def usage(self) -> dict[str, float]:
        return self.judge.usage()

    def check(self) -> None:
        """Reachable: the endpoint lists the model (``/v1/models``), or the local model loaded."""
        from kfp_components.feedback.endpoint import FeedbackError

        try:
            self.judge.check()
        except FeedbackError as exc:
            raise RewardError(self.where, str(exc)) from None

    def close(self) -> None:
        self.judge.close()
