"""Several datasets mixed into one: ``dataset_name_or_path: "uri_a:0.7,uri_b:0.3"`` or ``"uri_a:5000,uri_b:1000"``.

A mixture is a comma-separated list of sources, each a dataset URI followed by ``:weight`` (a number with a
decimal point: the share of the mixture's rows) or ``:rows`` (a whole number: exactly that many rows).
Weights and row counts are not mixed in one list. A single URI (no comma) is read whole, as always.

With weights, the mixture is as large as it can be without repeating a row: ``N = min(valid_i / share_i)``
rows, of which source ``i`` gives ``round(share_i * N)`` (the source that limits ``N`` gives every row).
Each source's rows are a seeded sample of its valid rows, and the mixture is shuffled with the same seed.

In a stage's YAML the sources may be a list instead (:func:`mixture_from_list`), each a mapping with ``uri``
and ``weight`` or ``rows``, or a ``uri:amount`` string; it is read into the string form above.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kfp_components.data.errors import DatasetError

_SOURCE = re.compile(r"^(?P<uri>.+):(?P<amount>\d+|\d*\.\d+)$")


@dataclass(frozen=True)
class Source:
    """One dataset of a mixture: its URI and either a ``weight`` or a number of ``rows`` (None: all)."""

    uri: str
    weight: float | None = None
    rows: int | None = None


def parse_sources(spec: str) -> list[Source]:
    """The sources of ``dataset_name_or_path``: one source (read whole) unless it is a mixture."""
    if "," not in spec:
        return [Source(spec)]
    parts = [part.strip() for part in spec.split(",")]
    matches = [_SOURCE.match(part) for part in parts]
    if not any(matches):
        return [Source(spec)]  # a URI with a comma in it (a query string)
    sources = []
    for part, match in zip(parts, matches, strict=True):
        if match is None:
            raise DatasetError(
                f"dataset_name_or_path: {part!r} of the mixture has no ':weight' (0.3) or ':rows' (5000); "
                "give every source one"
            )
        amount = match.group("amount")
        if "." in amount:
            sources.append(Source(match.group("uri"), weight=float(amount)))
        else:
            sources.append(Source(match.group("uri"), rows=int(amount)))
    weighted = [s.weight is not None for s in sources]
    if any(weighted) and not all(weighted):
        raise DatasetError(
            "dataset_name_or_path: a mixture gives every source a weight (0.7) or every source a number of "
            "rows (5000), not some of each"
        )
    for source in sources:
        if (source.weight is not None and source.weight <= 0) or source.rows == 0:
            raise DatasetError(f"dataset_name_or_path: source {source.uri!r} of the mixture takes no rows")
    return sources


def mixture_from_list(sources: Sequence[Any]) -> tuple[str, list[tuple[str, str]]]:
    """The string form of a list of sources (``[{"uri": ..., "weight": 0.7}, {"uri": ..., "rows": 500}]``,
    or ``"uri:amount"`` strings), and the problems found as ``(where, message)`` with ``where`` the item's
    index and key (``[1].weight``). The string is for :func:`parse_sources`, which checks what no single item
    shows (weights and rows mixed)."""
    parts: list[str] = []
    problems: list[tuple[str, str]] = []
    if len(sources) < 2:
        problems.append(
            ("", f"a mixture lists two sources or more, got {len(sources)}; give one source as a string")
        )
    for index, item in enumerate(sources):
        where = f"[{index}]"
        if isinstance(item, str):
            if not _SOURCE.match(item.strip()):
                problems.append((where, f"{item!r} has no ':weight' (0.3) or ':rows' (5000)"))
            parts.append(item.strip())
            continue
        if not isinstance(item, Mapping):
            problems.append((where, f"expected a mapping with uri and weight or rows, got {item!r}"))
            continue
        unknown = sorted(set(item) - {"uri", "weight", "rows"})
        if unknown:
            problems.append((f"{where}.{unknown[0]}", "unknown key; a source has uri and weight or rows"))
        uri = item.get("uri")
        if not isinstance(uri, str) or not uri:
            problems.append((f"{where}.uri", f"expected the source's dataset URI, got {uri!r}"))
        elif "," in uri:
            problems.append((f"{where}.uri", "a source of a mixture cannot have a comma in its URI"))
        has = [key for key in ("weight", "rows") if key in item]
        if len(has) != 1:
            problems.append((where, "give the source a weight (0.3) or a number of rows (5000), one of them"))
            continue
        amount = item[has[0]]
        if has[0] == "weight":
            if isinstance(amount, bool) or not isinstance(amount, (int, float)) or not amount > 0:
                problems.append((f"{where}.weight", f"expected a number above 0, got {amount!r}"))
                continue
            text = f"{float(amount):.12f}".rstrip("0")  # always with a decimal point: a weight, not rows
            text += "0" if text.endswith(".") else ""
        else:
            if isinstance(amount, bool) or not isinstance(amount, int) or amount < 1:
                problems.append((f"{where}.rows", f"expected a whole number of rows above 0, got {amount!r}"))
                continue
            text = str(amount)
        if isinstance(uri, str) and uri:
            parts.append(f"{uri}:{text}")
    return ",".join(parts), problems


def rows_to_take(sources: list[Source], valid: list[int]) -> list[int]:
    """How many rows each source gives to the mixture, given how many valid rows each has."""
    for source, count in zip(sources, valid, strict=True):
        if source.rows is not None and source.rows > count:
            raise DatasetError(
                f"{source.uri}: the mixture asks for {source.rows} rows but the source has {count} valid "
                "rows; ask for fewer or give a weight"
            )
    if sources[0].weight is None:
        return [
            count if source.rows is None else source.rows
            for source, count in zip(sources, valid, strict=True)
        ]
    total = sum(s.weight or 0.0 for s in sources)
    shares = [(s.weight or 0.0) / total for s in sources]
    size = min(count / share for count, share in zip(valid, shares, strict=True))
    return [min(count, round(share * size)) for count, share in zip(valid, shares, strict=True)]
