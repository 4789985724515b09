"""What every workflow returns, and the result files several of them write."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import cv2
import faiss
import pandas as pd
import torch

from reid.errors import Problem, ReidError, run_and_report
from reid.files import atomic_write, write_csv


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


def set_threads(threads: int | None) -> None:
    """Compute on `threads` CPU threads (None or 0: one per core): torch, FAISS, OpenCV and the pictures
    described at once (reid.images.map_pictures). Two runs sharing 2 cores should take 1 each: two
    processes of 2 busy threads each slow each other down many times over."""
    if threads:
        torch.set_num_threads(int(threads))
        faiss.omp_set_num_threads(int(threads))
        cv2.setNumThreads(int(threads))


Config = TypeVar("Config")


def run_mode(modes: Mapping[str, Callable[[Config], Outcome]], mode: str, config: Config) -> None:
    """Run an entry point's mode on its config: print its summary and files and log its problems.

    A `ReidError` (a user's bad input) ends in one line and exit status 1, never a traceback.
    """

    def run() -> tuple[dict[str, Path], list[Problem]]:
        if mode not in modes:
            raise ReidError(f"mode={mode} is not one of {', '.join(modes)}")
        outcome = modes[mode](config)
        for heading, values in outcome.summary.items():
            print(f"{heading}:", ", ".join(f"{k}={v}" for k, v in values.items()))
        return outcome.files, outcome.problems

    run_and_report(run, what=f"mode={mode}")
