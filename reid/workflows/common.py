"""What every workflow returns, and the result files several of them write."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pandas as pd

from reid.errors import Problem, ReidError, run_and_report
from reid.files import atomic_write, write_csv
from reid.images import set_threads


@dataclass
class Outcome:
    """What a workflow produced (files by name) and every input it had to skip."""

    files: dict[str, Path] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    """Short results the entry point prints, by heading (a demo's truth check)."""


def write_counts(counts: pd.DataFrame, out_dir: str | Path) -> Path:
    """Write counts.csv and counts.json (with each group's individuals) into `out_dir`; return the JSON's path."""
    out_dir = Path(out_dir)
    write_csv(counts, out_dir / "counts.csv")
    with atomic_write(out_dir / "counts.json") as f:
        json.dump(counts.to_dict("records"), f, indent=2, default=str)
    return out_dir / "counts.json"


Config = TypeVar("Config")


def run_mode(
    modes: Mapping[str, Callable[[Config], Outcome]], mode: str, config: Config, *, threads: int | None = None
) -> None:
    """Run an entry point's mode on its config, on `threads` CPU threads (`reid.images.set_threads`): print its
    summary and files and log its problems.

    A `ReidError` (a user's bad input) ends in one line and exit status 1, never a traceback.
    """

    def run() -> tuple[dict[str, Path], list[Problem]]:
        set_threads(threads)
        if mode not in modes:
            raise ReidError(f"mode={mode} is not one of {', '.join(modes)}")
        outcome = modes[mode](config)
        for heading, values in outcome.summary.items():
            print(f"{heading}:", ", ".join(f"{k}={v}" for k, v in values.items()))
        return outcome.files, outcome.problems

    run_and_report(run, what=f"mode={mode}")
