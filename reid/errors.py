"""Errors and problem reports shared by the whole library.

A `Problem` is one bad input that was reported and skipped (the run goes on);
a `ReidError` stops the operation because going on would be wrong.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


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


# Settings whose names say they hold a path: their message shows how to quote one.
_PATH_WORDS = ("path", "dir", "root", "file", "folder", "gallery", "archive", "embedder", "partner", "aliases")


def run_and_report(run: Callable[[], tuple[Mapping[str, Any], list[Problem]]], *, what: str) -> None:
    """Run an entry point's step: log its problems and print the files it wrote; exit 1 with the message on bad input.

    A user's bad input ends in one readable line, never a traceback: a ReidError,
    also when a wrapper (Hydra's instantiation error) raised it from one, and a
    required setting left unset (OmegaConf's MissingMandatoryValue). Anything else
    is a bug and keeps its traceback.
    """
    try:
        files, problems = run()
    except Exception as err:
        message = user_error_message(err)
        if message is None:
            raise
        log.error("%s", message)
        sys.exit(1)
    report(problems, what=what)
    width = max((len(name) for name in files), default=0)
    for name, path in files.items():
        print(f"{name:>{width}}: {path}")


def user_error_message(err: BaseException) -> str | None:
    """Return the one-line message for an error caused by the user's input, or None for a bug.

    Walks the chain of causes (`raise ... from`, and exceptions raised while
    handling another), so a ReidError wrapped by a framework is still found.
    """
    for link in _chain(err):
        if isinstance(link, ReidError):
            return str(link)
    for link in _chain(err):
        # Matched by name: the library never imports omegaconf.
        if type(link).__name__ == "MissingMandatoryValue":
            return missing_setting_message(link)
    return None


def missing_setting_message(err: BaseException) -> str:
    """Return "setting X is required: ..." for OmegaConf's MissingMandatoryValue (a `???` left unset)."""
    key = getattr(err, "full_key", None)
    if not key:
        first_line = str(err).splitlines()[0] if str(err) else ""
        key = first_line.rpartition(":")[2].strip() or "?"
    message = f"setting {key} is required: set it on the command line, e.g. {key}=..."
    if any(word in key.rsplit(".", 1)[-1] for word in _PATH_WORDS):
        message += f" (a path with spaces or non-ASCII letters in quotes: '{key}=\"/path/to/my data\"')"
    return message


def quoting_hint(path: str | Path) -> str:
    """Return a hint for a path that does not exist but looks cut at a space ("" when it does not).

    An unquoted path with spaces reaches the program cut at the first space, as
    `/data/Camera` for `/data/Camera Trap 2023/labels.csv`: when a file or folder
    beside the first missing part of the path starts with its name and a space,
    name it and say how to quote.
    """
    path = Path(path)
    missing = next((p for p in reversed([path, *path.parents]) if not p.exists()), None)
    if missing is None or not missing.name:
        return ""
    try:
        beside = sorted(p.name for p in missing.parent.iterdir() if p.name.startswith(missing.name + " "))
    except OSError:
        return ""
    if not beside:
        return ""
    meant = missing.parent / beside[0]
    shown = f"{meant}/..." if meant.is_dir() else str(meant)
    return (
        f" (the path looks cut at a space: {meant} exists; on the command line put a path with spaces in quotes, "
        f"as in 'setting=\"{shown}\"')"
    )


def command_line_problem(overrides: Sequence[str]) -> str | None:
    """Return a one-line message for command-line settings Hydra would misread, or None when they look right.

    Catches the two ways a path breaks the override parser: a path with spaces
    left unquoted (the shell splits it, so a piece without `=` follows a setting)
    and a path with non-ASCII letters outside quotes. The message shows the
    setting quoted as it should be typed.
    """
    for i, token in enumerate(overrides):
        key, equals, value = token.partition("=")
        if not equals or token.startswith("-"):
            continue
        pieces = []
        for piece in overrides[i + 1 :]:
            if "=" in piece or piece.startswith(("-", "~", "+")):
                break
            pieces.append(piece)
        if pieces:
            whole = " ".join([value, *pieces])
            return (
                f"{pieces[0]!r} after {token!r} is not a setting (key=value); if it is part of a path with spaces, "
                f"quote the whole setting: '{key}=\"{whole}\"'"
            )
        quoted = value[:1] in ("'", '"') and value[-1:] == value[:1]
        if not quoted and not value.isascii():
            return (
                f"{token!r}: a value with non-ASCII letters must be in quotes on the command line: '{key}=\"{value}\"'"
            )
    return None


def _chain(err: BaseException) -> Iterator[BaseException]:
    """Yield an exception and its causes and contexts, each once."""
    seen: set[int] = set()
    link: BaseException | None = err
    while link is not None and id(link) not in seen:
        seen.add(id(link))
        yield link
        link = link.__cause__ or link.__context__
