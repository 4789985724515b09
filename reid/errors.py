"""Errors and problem reports shared by the whole library.

A `Problem` is one bad input that was reported and skipped (the run goes on);
a `ReidError` stops the operation because going on would be wrong.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

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


def run_and_report(run: Callable[[], tuple[Mapping[str, Any], list[Problem]]], *, what: str) -> None:
    """Run an entry point's step: log its problems and print the files it wrote; exit 1 with the message on ReidError.

    A user's bad input ends in one readable line, never a traceback.
    """
    try:
        files, problems = run()
    except ReidError as err:
        log.error("%s", err)
        sys.exit(1)
    report(problems, what=what)
    width = max((len(name) for name in files), default=0)
    for name, path in files.items():
        print(f"{name:>{width}}: {path}")
