"""Errors and problem reports shared by the whole library.

A `Problem` is one bad input that was reported and skipped (the run goes on);
a `ReidError` stops the operation because going on would be wrong.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

log = logging.getLogger("reid")


class ReidError(Exception):
    """An error caused by the user's input, with a message that says what to fix."""


class CatalogueError(ReidError):
    """A catalogue table or file is invalid."""


@dataclass(frozen=True)
class Problem:
    """One input that could not be used: which file, where in it, what is wrong and the fix."""

    source: str
    where: str
    message: str

    def __str__(self) -> str:
        where = f" {self.where}" if self.where else ""
        return f"{self.source}{where}: {self.message}"


def report(problems: Iterable[Problem], *, what: str, max_lines: int = 20) -> None:
    """Log problems as warnings, at most `max_lines` of them plus a count of the rest."""
    problems = list(problems)
    for problem in problems[:max_lines]:
        log.warning("%s", problem)
    if len(problems) > max_lines:
        log.warning("... and %d more problems while %s", len(problems) - max_lines, what)
