"""What a pairwise judge is for: label pairs of a policy's own responses, and measure a win rate.

* :func:`sample_responses`: a model's responses to ``prompt`` rows (the RL engine's prompt rendering and
  rollout code: the chat template and generation prompt, seeded sampling, EOS and stop handling).
* :func:`label_pairs`: two responses per prompt, judged in both orders; the better one becomes ``chosen``,
  the other ``rejected``: a ``preference`` dataset for DPO or a reward model. A pair is kept when the judge
  is decided enough: ``|2 p - 1| >= min_margin`` where ``p`` is the order-averaged probability that the first
  is better (so with an endpoint judge's hard verdicts, ``min_margin`` 0.5 keeps the pairs whose two orders
  agree and drops those where the judge only followed the position). Identical responses and pairs without a
  verdict are dropped too; every drop is counted.
* :func:`label_preferences`: both together: a model's two answers per prompt, judged into a ``preference``
  JSONL file (rlaif's ``distilled`` and ``preference_data`` modes, locally and as a pipeline step).
* :func:`win_rate`: greedy responses of a tuned and a starting model to held-out prompts, compared by the
  judge in both orders: the mean preference for the tuned model (a tie counts half), with wins, ties and
  losses.

torch and transformers are imported when a model loads.
"""

from __future__ import annotations

import json
import logging
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kfp_components.feedback.judges import JudgeOptions, PairwiseJudge

if TYPE_CHECKING:
    from kfp_components.trainer.rollout import SamplingOptions

log = logging.getLogger(__name__)

#: Prompts generated for at once.
PROMPTS_PER_BATCH = 16


@dataclass
class Responses:
    """A model's responses: per prompt row, its prompt, its other columns and ``num_generations`` texts."""

    prompts: list[Any]
    columns: list[dict[str, Any]]
    texts: list[list[str]]
    truncated: int = 0


def sample_responses(
    model: str,
    prompts_path: str | Path,
    sampling: SamplingOptions,
    *,
    max_seq_len: int,
    seed: int = 42,
    limit: int = 0,
    device: str = "",
    overlong: str = "drop",
) -> Responses:
    """``sampling.num_generations`` responses of ``model`` to each ``prompt`` row of ``prompts_path`` (the
    first ``limit`` rows; 0: all), drawn as ``sampling`` says (:meth:`SamplingOptions.greedy`: the most likely
    answer). Prompts longer than ``max_seq_len - sampling.max_new_tokens`` tokens are handled by ``overlong``
    (drop or truncate), as in training."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kfp_components.trainer.online import prompt_seed
    from kfp_components.trainer.prompts import load_prompts
    from kfp_components.trainer.rollout import HFRollouts

    where = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tokenizer = AutoTokenizer.from_pretrained(model)
    prompt_set = load_prompts(
        prompts_path, tokenizer, max_prompt_tokens=max_seq_len - sampling.max_new_tokens, overlong=overlong
    )
    rows = prompt_set.rows[:limit] if limit else prompt_set.rows
    dtype = torch.bfloat16 if where.type == "cuda" else torch.float32
    loaded = AutoModelForCausalLM.from_pretrained(model, dtype=dtype)
    loaded = loaded.to(where)  # type: ignore[arg-type]
    backend = HFRollouts(loaded, tokenizer, where)
    num_generations = sampling.num_generations
    texts: list[list[str]] = []
    truncated = 0
    for start in range(0, len(rows), PROMPTS_PER_BATCH):
        batch = rows[start : start + PROMPTS_PER_BATCH]
        seeds = [prompt_seed(seed, 0, start + i) for i in range(len(batch))]
        completions = backend.generate([row.prompt_ids for row in batch], sampling, seeds)
        for i in range(len(batch)):
            mine = completions[i * num_generations : (i + 1) * num_generations]
            texts.append([c.text for c in mine])
            truncated += sum(c.truncated for c in mine)
    del backend, loaded
    return Responses(
        prompts=[row.prompt for row in rows],
        columns=[dict(row.columns) for row in rows],
        texts=texts,
        truncated=truncated,
    )


@dataclass
class PairLabelling:
    """What :func:`label_pairs` kept and dropped."""

    prompts: int = 0
    kept: int = 0
    dropped_identical: int = 0
    dropped_undecided: int = 0  # |2p - 1| below min_margin
    dropped_unjudged: int = 0  # one order without a verdict
    mean_confidence: float = 0.0  # mean |2p - 1| of the kept pairs

    def metrics(self) -> dict[str, float]:
        return {key: float(value) for key, value in asdict(self).items()}


def label_pairs(
    responses: Responses, judge: PairwiseJudge, *, min_margin: float
) -> tuple[list[dict[str, Any]], PairLabelling]:
    """``preference`` rows from the first two responses to each prompt (see the module docstring). Each row
    keeps the prompt row's other columns and adds ``judge_preference``: the judge's probability that
    ``chosen`` is better."""
    counts = PairLabelling(prompts=len(responses.prompts))
    candidates = [
        i
        for i, texts in enumerate(responses.texts)
        if len(texts) >= 2 and texts[0].strip() != texts[1].strip()
    ]
    counts.dropped_identical = counts.prompts - len(candidates)
    names = sorted(set().union(*(responses.columns[i].keys() for i in candidates))) if candidates else []
    preferences = judge.prefer(
        [responses.prompts[i] for i in candidates],
        [responses.texts[i][0] for i in candidates],
        [responses.texts[i][1] for i in candidates],
        {name: [responses.columns[i].get(name) for i in candidates] for name in names},
    )
    rows: list[dict[str, Any]] = []
    confidence = []
    for i, p in zip(candidates, preferences, strict=True):
        if p is None:
            counts.dropped_unjudged += 1
            continue
        margin = abs(2.0 * p - 1.0)
        if margin < min_margin or margin == 0.0:
            counts.dropped_undecided += 1
            continue
        first, second = responses.texts[i][0], responses.texts[i][1]
        chosen, rejected = (first, second) if p > 0.5 else (second, first)
        extra = {k: v for k, v in responses.columns[i].items() if k not in ("chosen", "rejected")}
        rows.append(
            {
                "prompt": responses.prompts[i],
                "chosen": chosen,
                "rejected": rejected,
                **extra,
                "judge_preference": round(max(p, 1.0 - p), 6),
            }
        )
        confidence.append(margin)
    counts.kept = len(rows)
    counts.mean_confidence = statistics.fmean(confidence) if confidence else 0.0
    return rows, counts


def write_jsonl(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """``rows`` as JSON lines, written to a temporary file and renamed (never a half-written file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    with partial.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    partial.replace(path)


def label_preferences(
    model: str,
    prompts_path: str | Path,
    output: Path,
    judge_options: JudgeOptions,
    sampling: SamplingOptions,
    *,
    min_margin: float,
    max_seq_len: int,
    seed: int = 42,
    overlong: str = "drop",
) -> dict[str, float]:
    """Two answers of ``model`` per ``prompt`` row of ``prompts_path`` (drawn as ``sampling`` says; its
    ``num_generations`` is 2), judged pairwise by the judge of ``judge_options`` into the ``preference`` rows
    of ``output`` (see :func:`label_pairs`); the metrics are the pair counts (``pairs/...``) and the judge's
    usage (``judge/...``). A :class:`ValueError` when the judge kept no pair, and then ``output`` is not
    written."""
    from kfp_components.feedback.judges import build_backend

    if sampling.num_generations != 2:
        raise ValueError(f"a judged pair is two answers per prompt, not {sampling.num_generations}")
    log.info("sampling two answers per prompt from %s to be judged by %s", model, judge_options.describe())
    responses = sample_responses(
        model, prompts_path, sampling, max_seq_len=max_seq_len, seed=seed, overlong=overlong
    )
    judge = PairwiseJudge(judge_options, build_backend(judge_options))
    try:
        rows, counts = label_pairs(responses, judge, min_margin=min_margin)
        usage = judge.usage()
    finally:
        judge.close()
    if not rows:
        raise ValueError(
            f"the judge kept no pair of the {counts.prompts} prompts ({counts.dropped_identical} with identical "
            f"answers, {counts.dropped_undecided} undecided, {counts.dropped_unjudged} without a verdict); "
            "raise temperature for more varied answers or lower preference_min_margin"
        )
    write_jsonl(rows, output)
    log.info(
        "judged pairs: %d of %d prompts kept (%d identical, %d undecided, %d without a verdict) -> %s",
        counts.kept,
        counts.prompts,
        counts.dropped_identical,
        counts.dropped_undecided,
        counts.dropped_unjudged,
        output,
    )
    return {
        **{f"pairs/{k}": v for k, v in counts.metrics().items()},
        **{f"judge/{k}": v for k, v in usage.items()},
    }


@dataclass
class WinRate:
    """A tuned model against its starting model on held-out prompts, judged both ways round."""

    win_rate: float  # mean preference for the tuned model over the judged prompts (a tie counts 0.5)
    wins: int
    ties: int
    losses: int
    judged: int
    unjudged: int

    def table(self, tuned: str, base: str) -> str:
        """Markdown: the win rate of ``tuned`` against ``base`` with its wins, ties and losses."""
        return "\n".join(
            [
                "## Win rate",
                "",
                f"`{tuned}` against `{base}`, judged in both orders (a tie counts half).",
                "",
                "| win rate | wins | ties | losses | judged | without a verdict |",
                "| --- | --- | --- | --- | --- | --- |",
                f"| {self.win_rate:.3f} | {self.wins} | {self.ties} | {self.losses} | {self.judged} | {self.unjudged} |",
                "",
            ]
        )

    def metrics(self, prefix: str = "win_rate") -> dict[str, float]:
        return {
            prefix: self.win_rate,
            f"{prefix}/wins": float(self.wins),
            f"{prefix}/ties": float(self.ties),
            f"{prefix}/losses": float(self.losses),
            f"{prefix}/judged": float(self.judged),
            f"{prefix}/unjudged": float(self.unjudged),
        }


def compare(tuned: Responses, base: Responses, judge: PairwiseJudge) -> WinRate:
    """The judge's preference for ``tuned``'s first response over ``base``'s, prompt by prompt."""
    names = sorted(set().union(*(row.keys() for row in tuned.columns))) if tuned.columns else []
    preferences = judge.prefer(
        tuned.prompts,
        [texts[0] for texts in tuned.texts],
        [texts[0] for texts in base.texts],
        {name: [row.get(name) for row in tuned.columns] for name in names},
    )
    judged = [p for p in preferences if p is not None]
    return WinRate(
        win_rate=statistics.fmean(judged) if judged else float("nan"),
        wins=sum(p > 0.5 for p in judged),
        ties=sum(p == 0.5 for p in judged),
        losses=sum(p < 0.5 for p in judged),
        judged=len(judged),
        unjudged=len(preferences) - len(judged),
    )


def win_rate(
    tuned_model: str,
    base_model: str,
    prompts_path: str | Path,
    judge: PairwiseJudge,
    *,
    max_new_tokens: int,
    max_seq_len: int,
    stop_strings: Sequence[str] = (),
    limit: int = 0,
    device: str = "",
    overlong: str = "drop",
) -> WinRate:
    """Greedy responses of both models to the prompts of ``prompts_path``, compared (see :func:`compare`)."""
    from kfp_components.trainer.rollout import SamplingOptions

    greedy = SamplingOptions.greedy(max_new_tokens, stop_strings)
    options: dict[str, Any] = {
        "max_seq_len": max_seq_len,
        "limit": limit,
        "device": device,
        "overlong": overlong,
    }
    tuned = sample_responses(tuned_model, prompts_path, greedy, **options)
    base = sample_responses(base_model, prompts_path, greedy, **options)
    result = compare(tuned, base, judge)
    log.info(
        "win rate of %s against %s: %.3f (%d wins, %d ties, %d losses over %d prompts)",
        tuned_model,
        base_model,
        result.win_rate,
        result.wins,
        result.ties,
        result.losses,
        result.judged,
    )
    return result
