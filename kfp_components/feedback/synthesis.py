"""Synthetic reasoning data: a teacher writes step-by-step solutions, only the verified ones are kept.

:func:`synthesize` reads ``prompt`` rows with a reference answer (``answer_column``), asks the teacher
(:mod:`kfp_components.feedback.teacher`) for ``num_samples`` traces per problem, and keeps a trace when
(rejection sampling, in this order; the first failed check names the drop):

1. it is not empty (``empty``);
2. its final answer matches the reference: ``answer_checker(trace, reference)`` when one is given, else the
   answer :func:`~kfp_components.rewards.answers.extract_answer` finds (``#### N``, ``\\boxed{N}``, "the answer
   is N", the last number) equals the reference's (:func:`~kfp_components.rewards.answers.answers_match`, numbers
   within ``answer_tolerance``): ``no_answer`` when nothing is extracted, else ``wrong_answer``. A trace that
   passes is *verified*;
3. its length is within ``min_trace_chars`` / ``max_trace_chars`` (``too_short``, ``too_long``);
4. with ``language`` set, at most half of its letters are of another script (``language``): each letter's script
   is the first word of its Unicode name (``LATIN SMALL LETTER A``: latin; ``CJK UNIFIED IDEOGRAPH``: cjk);
   a trace without letters passes;
5. it is not a near-copy of a trace already kept for the same problem (``duplicate``): the same words (case and
   spacing aside), or, with ``dedup_threshold`` below 1, a Jaccard similarity of their word 3-shingles at or
   above it;
6. fewer than ``max_traces_per_problem`` traces of the problem are kept already (``over_limit``).

Output rows (the ``messages`` format): the problem's turns as sent to the teacher (without the system prompt)
and the trace as the assistant's turn, with provenance: ``teacher`` (the model), ``sample_index``,
``verified``, ``problem`` (the 0-based row number of the problem) and ``answer`` (the reference). Problems
without a kept trace go to ``unsolved.jsonl`` beside the output (the problem, the teacher's first trace, what was
extracted from it, and the drops).

Resumable: problems are processed in chunks of ``chunk_size``; after each chunk its rows are appended to
``<output>.partial`` (flushed and fsynced) and ``<output>.progress.json`` records the problems done, the
bytes written and the counts so far. A rerun with the same problems and options (a hash of both; the
endpoint's address, concurrency, timeouts, retries and request budget aside, so a run stopped by its budget
continues with a larger one) truncates the partial file to the recorded size and continues with the next
problem; each problem's samples depend only on the seed and its index, so a resumed run writes what an
uninterrupted one would. Changed problems or options start over (a warning says so). At the end the partial
files are renamed into place and the progress file removed.

No kept trace at all is a :class:`ValueError` quoting two traces, what was extracted from them and the
reference beside it; nothing is left behind then.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from kfp_components.feedback.teacher import Teacher, TeacherOptions, conversation, student_turns
from kfp_components.rewards.answers import answers_match, extract_answer
from kfp_components.typed_config import ConfigError, Options, to_dict

log = logging.getLogger(__name__)

#: Why a trace was not kept, in the order the checks run.
DROP_REASONS = (
    "empty",
    "no_answer",
    "wrong_answer",
    "too_short",
    "too_long",
    "language",
    "duplicate",
    "over_limit",
)
#: Scripts ``language`` accepts: the first word of the Unicode names of their letters, lower-cased.
Script = Literal["", "latin", "cyrillic", "greek", "arabic", "hebrew", "cjk", "hangul", "devanagari", "thai"]
#: Words per shingle of the near-duplicate check.
SHINGLE_WORDS = 3
#: How much of a trace an error message or the unsolved list quotes.
EXCERPT_CHARS = 300
#: Options of the teacher that change where and how fast it is asked, not what it writes: a rerun with other
#: values continues an interrupted run.
OPERATIONAL_OPTIONS = (
    "base_url",
    "token_env",
    "token_secret",
    "max_concurrency",
    "timeout_seconds",
    "retries",
    "backoff_seconds",
    "max_requests",
    "batch_size",
    "device",
)
_PROGRESS_VERSION = 1


@dataclass
class RejectionOptions(Options):
    """Which traces are kept.

    Attributes:
        answer_column: Column of the problem rows holding the reference answer.
        answer_checker: module:function or path/to/file.py:function called as checker(trace, reference) ->
            bool; empty: the answer extracted from the trace ("#### N", boxed, "the answer is N", the last
            number) must equal the reference.
        answer_tolerance: Numbers also match when |a - b| <= answer_tolerance * max(1, |b|) (b the reference).
        min_trace_chars: Shortest kept trace in characters (0: no bound).
        max_trace_chars: Longest kept trace in characters (0: no bound).
        language: Empty, or the script most letters of a kept trace must be in (latin, cyrillic, greek,
            arabic, hebrew, cjk, hangul, devanagari, thai).
        dedup_threshold: Drop a trace whose word 3-shingle Jaccard similarity to a trace kept for the same
            problem is at least this; 1.0 drops only traces with the same words.
        max_traces_per_problem: Keep at most this many traces per problem (0: all that pass).
    """

    answer_column: str = "answer"
    answer_checker: str = ""
    answer_tolerance: float = 0.0
    min_trace_chars: int = 0
    max_trace_chars: int = 0
    language: Script = ""
    dedup_threshold: float = 1.0
    max_traces_per_problem: int = 0

    def validate(self) -> None:
        problems: list[tuple[str, str]] = []
        if not self.answer_column.strip():
            problems.append(("answer_column", "must name a column of the problem rows"))
        if self.answer_checker:
            target, _, attribute = self.answer_checker.rpartition(":")
            if not target or not attribute:
                problems.append(
                    (
                        "answer_checker",
                        f"expected module:function or path/to/file.py:function, got {self.answer_checker!r}",
                    )
                )
        if not math.isfinite(self.answer_tolerance) or self.answer_tolerance < 0:
            problems.append(
                ("answer_tolerance", f"must be a finite number >= 0, got {self.answer_tolerance}")
            )
        for key in ("min_trace_chars", "max_trace_chars"):
            if getattr(self, key) < 0:
                problems.append((key, f"must not be negative (0: no bound), got {getattr(self, key)}"))
        if 0 < self.max_trace_chars < self.min_trace_chars:
            problems.append(
                (
                    "max_trace_chars",
                    f"must be at least min_trace_chars ({self.min_trace_chars}), got {self.max_trace_chars}",
                )
            )
        if not 0 < self.dedup_threshold <= 1:
            problems.append(("dedup_threshold", f"must be in (0, 1], got {self.dedup_threshold}"))
        if self.max_traces_per_problem < 0:
            problems.append(
                (
                    "max_traces_per_problem",
                    f"must not be negative (0: all), got {self.max_traces_per_problem}",
                )
            )
        if problems:
            raise ConfigError.of(problems)


def letter_script(character: str) -> str:
    """The script of a letter: the first word of its Unicode name, lower-cased (``a``: latin)."""
    return unicodedata.name(character, "unknown").split(" ", 1)[0].lower()


def foreign_share(text: str, script: str) -> float:
    """The share of ``text``'s letters that are not of ``script`` (0 when it has no letters)."""
    letters = [character for character in text if character.isalpha()]
    if not letters:
        return 0.0
    return sum(letter_script(character) != script for character in letters) / len(letters)


def _words(text: str) -> tuple[str, ...]:
    return tuple(text.casefold().split())


def _shingles(words: tuple[str, ...]) -> set[tuple[str, ...]]:
    if len(words) <= SHINGLE_WORDS:
        return {words}
    return {words[i : i + SHINGLE_WORDS] for i in range(len(words) - SHINGLE_WORDS + 1)}


def similarity(a: str, b: str) -> float:
    """1.0 for the same words (case and spacing aside), else the Jaccard similarity of the word 3-shingles."""
    words_a, words_b = _words(a), _words(b)
    if words_a == words_b:
        return 1.0
    shingles_a, shingles_b = _shingles(words_a), _shingles(words_b)
    union = shingles_a | shingles_b
    return min(len(shingles_a & shingles_b) / len(union), 1.0 - 1e-9) if union else 0.0


@dataclass
class Verdict:
    """What the answer check made of one trace."""

    verified: bool
    extracted: str | None  # the extracted answer; None with a checker or when nothing was found


@dataclass
class Selection:
    """The traces of one problem that were kept, and why the others were not."""

    kept: list[tuple[int, str]]  # (sample index, trace)
    dropped: dict[str, int]
    verified: int
    first_extracted: str | None


class TraceFilter:
    """The checks of :class:`RejectionOptions` (see the module docstring). ``base_dir``: where a relative
    ``path/file.py:function`` checker is found (default: the working directory)."""

    def __init__(self, options: RejectionOptions, *, base_dir: Path | None = None):
        options.validate()
        self.options = options
        self.checker: Callable[[str, Any], Any] | None = None
        if options.answer_checker:
            from kfp_components.rewards.errors import RewardError
            from kfp_components.rewards.loading import resolve_function

            try:
                self.checker = resolve_function(options.answer_checker, base_dir=base_dir)
            except RewardError as exc:
                raise ConfigError("answer_checker", str(exc)) from None

    def verdict(self, trace: str, reference: Any) -> Verdict:
        """Whether ``trace``'s answer matches ``reference``."""
        if self.checker is None:
            extracted = extract_answer(trace)
            return Verdict(
                answers_match(extracted, reference, tolerance=self.options.answer_tolerance), extracted
            )
        result = self.checker(trace, reference)
        if not isinstance(result, bool):
            raise TypeError(
                f"answer_checker {self.options.answer_checker} returned {type(result).__name__} "
                f"{result!r}; it must return True or False"
            )
        return Verdict(result, None)

    def select(self, texts: Sequence[str | None], reference: Any) -> Selection:
        """The traces of one problem to keep, in sample order."""
        options = self.options
        dropped = dict.fromkeys(DROP_REASONS, 0)
        kept: list[tuple[int, str]] = []
        verified = 0
        first_extracted: str | None = None
        for index, raw in enumerate(texts):
            trace = (raw or "").strip()
            if not trace:
                dropped["empty"] += 1
                continue
            verdict = self.verdict(trace, reference)
            if index == 0:
                first_extracted = verdict.extracted
            if not verdict.verified:
                no_answer = self.checker is None and verdict.extracted is None
                dropped["no_answer" if no_answer else "wrong_answer"] += 1
                continue
            verified += 1
            if options.min_trace_chars and len(trace) < options.min_trace_chars:
                dropped["too_short"] += 1
            elif options.max_trace_chars and len(trace) > options.max_trace_chars:
                dropped["too_long"] += 1
            elif options.language and foreign_share(trace, options.language) > 0.5:
                dropped["language"] += 1
            elif any(similarity(trace, other) >= options.dedup_threshold for _, other in kept):
                dropped["duplicate"] += 1
            elif options.max_traces_per_problem and len(kept) >= options.max_traces_per_problem:
                dropped["over_limit"] += 1
            else:
                kept.append((index, trace))
        return Selection(kept, dropped, verified, first_extracted)


@dataclass
class SynthesisSummary:
    """What a synthesis run produced (over all its resumed parts)."""

    problems: int
    traces_generated: int
    traces_kept: int
    verified_share: float  # verified traces / traces generated: the teacher's accuracy
    dropped: dict[str, int]
    problems_without_trace: int
    unsolved_path: str
    prompt_tokens: int
    completion_tokens: int
    requests: int
    resumed_problems: int  # problems done by an earlier, interrupted run
    output_path: str = ""
    retries: int = 0
    failures: int = 0

    def metrics(self) -> dict[str, float]:
        """Flat numbers for a Metrics artifact: the counts, ``verified_share`` and ``dropped_<reason>``."""
        values: dict[str, float] = {
            "problems": self.problems,
            "traces_generated": self.traces_generated,
            "traces_kept": self.traces_kept,
            "verified_share": self.verified_share,
            "problems_without_trace": self.problems_without_trace,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "requests": self.requests,
            "retries": self.retries,
            "failures": self.failures,
            "resumed_problems": self.resumed_problems,
        }
        values.update({f"dropped_{reason}": count for reason, count in self.dropped.items()})
        return {name: float(value) for name, value in values.items()}


@dataclass
class _Counts:
    """The running totals a progress file carries."""

    traces_generated: int = 0
    traces_kept: int = 0
    verified: int = 0
    problems_without_trace: int = 0
    dropped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DROP_REASONS, 0))
    usage: dict[str, float] = field(default_factory=dict)
    examples: list[dict[str, Any]] = field(default_factory=list)  # the first traces, for the no-trace error

    def add(self, selection: Selection, generated: int) -> None:
        self.traces_generated += generated
        self.traces_kept += len(selection.kept)
        self.verified += selection.verified
        self.problems_without_trace += not selection.kept
        for reason, count in selection.dropped.items():
            self.dropped[reason] = self.dropped.get(reason, 0) + count


def read_problems(path: str | Path, answer_column: str) -> list[dict[str, Any]]:
    """The problem rows of a JSONL file; a :class:`ValueError` naming ``file:line`` of the first bad rows (not
    JSON, not a ``prompt`` row, no reference answer in ``answer_column``)."""
    from kfp_components.data.formats import PROMPT, check_row

    rows: list[dict[str, Any]] = []
    problems: list[str] = []
    bad = 0
    with Path(path).open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                found = [f"{where}: not valid JSON ({exc.msg})"]
            else:
                found = [f"{where}: {problem}" for problem in check_row(row, PROMPT)]
                if not found:
                    value = row.get(answer_column)
                    if value is None or (isinstance(value, str) and not value.strip()):
                        have = ", ".join(sorted(row)) or "none"
                        state = "is empty" if answer_column in row else "is missing"
                        found = [
                            f"{where}: the answer column {answer_column!r} {state} (the row has: {have}); "
                            "each problem needs its reference answer (set answer_column to the column holding it)"
                        ]
            if found:
                bad += 1
                problems += found
                continue
            rows.append(row)
    if problems:
        shown = "\n  ".join(problems[:5])
        more = f"\n  ... and {bad - min(bad, 5)} more bad rows" if bad > 5 else ""
        raise ValueError(f"{path}: {bad} problem row(s) cannot be used:\n  {shown}{more}")
    if not rows:
        raise ValueError(f"{path}: no problem rows")
    return rows


def synthesize(
    problems_path: str | Path,
    output_path: str | Path,
    teacher: TeacherOptions,
    rejection: RejectionOptions,
    *,
    seed: int = 42,
    device: str = "",
    chunk_size: int = 32,
    progress: bool = True,
    unsolved_path: str | Path = "",
    base_dir: Path | None = None,
    record_done: bool = True,
) -> SynthesisSummary:
    """Write verified teacher traces for the problems of ``problems_path`` to ``output_path`` (see the module
    docstring). ``unsolved_path``: where the problems without a kept trace go (default ``unsolved.jsonl`` in
    the output's folder). Everything about the input and the options is checked before the teacher is
    asked anything. ``record_done``: leave ``<output>.done.json`` (the fingerprint and the summary), so a
    rerun of the same synthesis returns at once instead of asking the teacher again."""
    if chunk_size < 1:
        raise ConfigError("chunk_size", f"must be at least 1, got {chunk_size}")
    teacher.validate()
    if teacher.backend == "openai" and teacher.max_concurrency > chunk_size:
        log.warning(
            "synthesis: max_concurrency %d is above chunk_size %d; at most %d requests are in flight at once "
            "(raise chunk_size to at least max_concurrency, twice it keeps the endpoint busier)",
            teacher.max_concurrency,
            chunk_size,
            chunk_size,
        )
    trace_filter = TraceFilter(rejection, base_dir=base_dir)
    problems_path = Path(problems_path)
    rows = read_problems(problems_path, rejection.answer_column)
    for row in rows:
        conversation(teacher, row)  # an unknown template placeholder fails here, before any request
    output = Path(output_path)
    unsolved = Path(unsolved_path) if unsolved_path else output.parent / "unsolved.jsonl"
    output.parent.mkdir(parents=True, exist_ok=True)
    unsolved.parent.mkdir(parents=True, exist_ok=True)
    files = _Files(output, unsolved)
    fingerprint = _fingerprint(problems_path, teacher, rejection, seed)
    finished = files.finished(fingerprint)
    if finished is not None:
        log.info(
            "synthesis: %s is already complete for these problems and options; the teacher is not asked",
            output,
        )
        return finished
    model = Teacher(teacher, device=device)
    try:
        model.check()  # reachable and serving the model (a local one loads) before any file is touched
        done, counts = files.resume(fingerprint, len(rows))
        started = time.perf_counter()
        for start in range(done, len(rows), chunk_size):
            chunk = rows[start : start + chunk_size]
            indices = list(range(start, start + len(chunk)))
            try:
                texts = model.solve(chunk, seed, indices=indices)
            except Exception as exc:
                counts.usage = _add_usage(files.usage_before, model.usage())
                files.commit(fingerprint, len(rows), start, counts, [], [])  # the requests spent count too
                _add_progress_note(exc, start, len(rows), files.dataset_partial)
                raise
            dataset_lines, unsolved_lines = [], []
            for index, row, samples in zip(indices, chunk, texts, strict=True):
                reference = row[rejection.answer_column]
                selection = trace_filter.select(samples, reference)
                counts.add(selection, len(samples))
                _remember_examples(counts, index, samples, reference, extract=trace_filter.checker is None)
                turns = student_turns(teacher, row)
                for sample_index, trace in selection.kept:
                    dataset_lines.append(
                        {
                            "messages": [*turns, {"role": "assistant", "content": trace}],
                            "teacher": teacher.model,
                            "sample_index": sample_index,
                            "verified": True,
                            "problem": index,
                            "answer": reference,
                        }
                    )
                if not selection.kept:
                    first = samples[0] if samples else None
                    unsolved_lines.append(
                        {
                            "problem": index,
                            "prompt": row["prompt"],
                            "answer": reference,
                            "first_trace": first,
                            "extracted": selection.first_extracted,
                            "dropped": {k: v for k, v in selection.dropped.items() if v},
                        }
                    )
            counts.usage = _add_usage(files.usage_before, model.usage())
            files.commit(fingerprint, len(rows), start + len(chunk), counts, dataset_lines, unsolved_lines)
            if progress:
                _log_chunk(start + len(chunk), len(rows), done, counts, time.perf_counter() - started)
    finally:
        model.close()

    if counts.traces_kept == 0:
        files.discard()
        raise ValueError(_no_trace_message(counts, len(rows), rejection))
    files.finish()
    summary = SynthesisSummary(
        problems=len(rows),
        traces_generated=counts.traces_generated,
        traces_kept=counts.traces_kept,
        verified_share=counts.verified / counts.traces_generated if counts.traces_generated else 0.0,
        dropped=dict(counts.dropped),
        problems_without_trace=counts.problems_without_trace,
        unsolved_path=str(unsolved),
        prompt_tokens=int(counts.usage.get("prompt_tokens", 0)),
        completion_tokens=int(counts.usage.get("completion_tokens", 0)),
        requests=int(counts.usage.get("requests", 0)),
        resumed_problems=done,
        output_path=str(output),
        retries=int(counts.usage.get("retries", 0)),
        failures=int(counts.usage.get("failures", 0)),
    )
    if record_done:
        files.record_done(fingerprint, summary)
    log.info(
        "synthesis: %d of %d traces kept (%.0f%% verified) for %d problems, %d without a trace (%s); %d requests, "
        "%d completion tokens",
        summary.traces_kept,
        summary.traces_generated,
        100 * summary.verified_share,
        summary.problems,
        summary.problems_without_trace,
        unsolved,
        summary.requests,
        summary.completion_tokens,
    )
    return summary


class _Files:
    """The partial outputs and the progress file of one synthesis (see the module docstring)."""

    def __init__(self, output: Path, unsolved: Path):
        self.output = output
        self.unsolved = unsolved
        self.dataset_partial = output.with_name(output.name + ".partial")
        self.unsolved_partial = unsolved.with_name(unsolved.name + ".partial")
        self.progress = output.with_name(output.name + ".progress.json")
        self.usage_before: dict[str, float] = {}

    def resume(self, fingerprint: str, total: int) -> tuple[int, _Counts]:
        """The problems done and the counts of an interrupted run of the same synthesis; else (0, empty),
        with the partial files cleared."""
        state = self._read_progress()
        if state is not None:
            reason = self._mismatch(state, fingerprint, total)
            if reason is None:
                for path, size in (
                    (self.dataset_partial, state["dataset_bytes"]),
                    (self.unsolved_partial, state["unsolved_bytes"]),
                ):
                    with path.open("r+b") as handle:
                        handle.truncate(size)
                counts = _Counts(**state["counts"])
                self.usage_before = dict(counts.usage)
                log.info(
                    "synthesis: resuming after %d of %d problems (%d traces kept so far) from %s",
                    state["problems_done"],
                    total,
                    counts.traces_kept,
                    self.progress,
                )
                return int(state["problems_done"]), counts
            log.warning("synthesis: %s; starting over", reason)
        self.discard()
        self.dataset_partial.write_bytes(b"")
        self.unsolved_partial.write_bytes(b"")
        return 0, _Counts()

    def _read_progress(self) -> dict[str, Any] | None:
        try:
            state = json.loads(self.progress.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.warning(
                "synthesis: the progress file %s cannot be read (%s); starting over", self.progress, exc
            )
            return None
        return state if isinstance(state, dict) else None

    def _mismatch(self, state: dict[str, Any], fingerprint: str, total: int) -> str | None:
        if state.get("version") != _PROGRESS_VERSION or state.get("fingerprint") != fingerprint:
            return (
                f"the problems or the options changed since the interrupted run recorded in {self.progress}"
            )
        if state.get("problems") != total:
            return f"{self.progress} records {state.get('problems')} problems, the input has {total}"
        for path, key in ((self.dataset_partial, "dataset_bytes"), (self.unsolved_partial, "unsolved_bytes")):
            size = path.stat().st_size if path.exists() else -1
            if size < int(state.get(key, 0)):
                return f"{path} is shorter than {self.progress} records"
        return None

    def commit(
        self,
        fingerprint: str,
        total: int,
        done: int,
        counts: _Counts,
        dataset_rows: list[dict[str, Any]],
        unsolved_rows: list[dict[str, Any]],
    ) -> None:
        """Append a chunk's rows (flushed, fsynced), then record the progress (written whole, renamed)."""
        sizes = {}
        for path, rows in ((self.dataset_partial, dataset_rows), (self.unsolved_partial, unsolved_rows)):
            with path.open("ab") as handle:
                for row in rows:
                    handle.write((json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8"))
                handle.flush()
                os.fsync(handle.fileno())
                sizes[path] = handle.tell()
        state = {
            "version": _PROGRESS_VERSION,
            "fingerprint": fingerprint,
            "problems": total,
            "problems_done": done,
            "dataset_bytes": sizes[self.dataset_partial],
            "unsolved_bytes": sizes[self.unsolved_partial],
            "counts": asdict(counts),
        }
        staging = self.progress.with_name(self.progress.name + ".tmp")
        with staging.open("w", encoding="utf-8") as handle:
            json.dump(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        staging.replace(self.progress)

    def finish(self) -> None:
        self.dataset_partial.replace(self.output)
        self.unsolved_partial.replace(self.unsolved)
        self.progress.unlink(missing_ok=True)

    @property
    def done(self) -> Path:
        return self.output.with_name(self.output.name + ".done.json")

    def record_done(self, fingerprint: str, summary: SynthesisSummary) -> None:
        """Remember a finished synthesis (its fingerprint, the output's size and the summary), so a rerun of
        the same one (a later step failed) does not ask the teacher again."""
        record = {
            "fingerprint": fingerprint,
            "output_bytes": self.output.stat().st_size,
            "summary": asdict(summary),
        }
        self.done.write_text(json.dumps(record), encoding="utf-8")

    def finished(self, fingerprint: str) -> SynthesisSummary | None:
        """The summary of a finished synthesis with this fingerprint whose output is still there, else None."""
        try:
            record = json.loads(self.done.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if (
            not isinstance(record, dict)
            or record.get("fingerprint") != fingerprint
            or not self.output.is_file()
            or self.output.stat().st_size != record.get("output_bytes")
        ):
            return None
        summary = SynthesisSummary(**record["summary"])
        summary.resumed_problems = summary.problems
        return summary

    def discard(self) -> None:
        for path in (self.dataset_partial, self.unsolved_partial, self.progress, self.done):
            path.unlink(missing_ok=True)


def _fingerprint(problems: Path, teacher: TeacherOptions, rejection: RejectionOptions, seed: int) -> str:
    """What makes a synthesis the same: the problems' bytes, the options that change the output, the seed."""
    digest = hashlib.sha256()
    with problems.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    options = {key: value for key, value in to_dict(teacher).items() if key not in OPERATIONAL_OPTIONS}
    described = {
        "problems": digest.hexdigest(),
        "teacher": options,
        "rejection": to_dict(rejection),
        "seed": seed,
    }
    return hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode()).hexdigest()


def _add_usage(before: Mapping[str, float], now: Mapping[str, float]) -> dict[str, float]:
    return {name: before.get(name, 0.0) + now.get(name, 0.0) for name in {*before, *now}}


def _remember_examples(
    counts: _Counts, index: int, samples: Sequence[str | None], reference: Any, *, extract: bool
) -> None:
    """Keep the first two non-empty traces (one per problem) for the error of a run that keeps none."""
    if len(counts.examples) >= 2:
        return
    trace = next((text.strip() for text in samples if text and text.strip()), None)
    if trace is None:
        return
    counts.examples.append(
        {
            "problem": index,
            "trace": _excerpt(trace),
            "extracted": extract_answer(trace) if extract else None,
            "reference": reference if isinstance(reference, str | int | float) else str(reference),
        }
    )


def _no_trace_message(counts: _Counts, problems: int, rejection: RejectionOptions) -> str:
    dropped = ", ".join(f"{reason} {count}" for reason, count in counts.dropped.items() if count) or "none"
    head = (
        f"no trace was kept: {counts.traces_generated} traces generated for {problems} problems, all dropped "
        f"({dropped}); nothing was written."
    )
    if counts.traces_generated and counts.dropped.get("empty", 0) == counts.traces_generated:
        return f"{head} The teacher returned only empty texts: check the model, max_tokens and the endpoint."
    if rejection.answer_checker:
        hint = f" answer_checker {rejection.answer_checker} accepted none of them."
    elif counts.verified:
        hint = " Some traces were verified but the length, language or duplicate filters dropped them all."
    else:
        hint = (
            " The answer extracted from the teacher's output (#### N, \\boxed{N}, 'the answer is N', else the last "
            f"number) never matched the {rejection.answer_column!r} column: ask for that format in the system "
            "prompt, set answer_checker, or check answer_column."
        )
    examples = "".join(
        f"\n  problem {example['problem']}: the teacher wrote {example['trace']!r}; extracted "
        f"{example['extracted']!r}; {rejection.answer_column} is {example['reference']!r}"
        for example in counts.examples
    )
    return head + hint + (f" Examples:{examples}" if examples else "")


def _add_progress_note(exc: BaseException, start: int, total: int, partial: Path) -> None:
    """Say on a teacher's error where the run stands and that a rerun continues there."""
    note = (
        f"synthesis stopped at problem {start} of {total}: the problems before it are written to {partial}; "
        "a rerun with the same problems and options continues from there"
    )
    exc.add_note(note)
    log.error("%s", note)


def _log_chunk(done: int, total: int, resumed: int, counts: _Counts, seconds: float) -> None:
    rate = (done - resumed) / seconds if seconds > 0 else 0.0
    eta = (total - done) / rate if rate > 0 else float("nan")
    log.info(
        "synthesis: %d/%d problems, %d traces kept, %.2f problems/s, ETA %s",
        done,
        total,
        counts.traces_kept,
        rate,
        "0 s" if done == total else (f"{eta:.0f} s" if math.isfinite(eta) else "unknown"),
    )


def _excerpt(text: str) -> str:
    return text if len(text) <= EXCERPT_CHARS else text[: EXCERPT_CHARS - 3] + "..."


__all__ = [
    "DROP_REASONS",
    "RejectionOptions",
    "SynthesisSummary",
    "TraceFilter",
    "read_problems",
    "similarity",
    "synthesize",
]
