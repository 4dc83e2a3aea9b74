"""Several datasets mixed into one: ``dataset_name_or_path: "uri_a:0.7,uri_b:0.3"`` or ``"uri_a:5000,uri_b:1000"``.

A mixture is a comma-separated list of sources, each a dataset URI followed by ``:weight`` (a number with a
decimal point: the share of the mixture's rows) or ``:rows`` (a whole number: exactly that many rows).
Weights and row counts are not mixed in one list. A single URI (no comma) is read whole, as always.

With weights, the mixture is as large as it can be without repeating a row: ``N = min(valid_i / share_i)``
rows, of which source ``i`` gives ``round(share_i * N)`` (the source that limits ``N`` gives every row).
Each source's rows are a seeded sample of its valid rows, and the mixture is shuffled with the same seed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

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
