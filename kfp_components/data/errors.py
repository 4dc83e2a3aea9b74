"""Errors of the dataset stage."""

from __future__ import annotations


class DatasetError(ValueError):
    """A dataset cannot be used: bad URI, unreachable source, unreadable or invalid file.

    The message says what is wrong and where, and never contains credentials.
    """
