"""Count individuals in a labelled catalogue (`infer.py mode=count`): the honest minimum and maximum per group."""

from __future__ import annotations

from pathlib import Path

from reid.census import count_table
from reid.importers import Source, load_source
from reid.workflows.common import Outcome, write_counts


def run_count(
    source: Source, out_dir: str | Path, *, count_by: tuple[str, ...] = ("country",), period: str | None = None
) -> Outcome:
    """Write counts.csv and counts.json of a source's identified captures: combined, then per group and period."""
    catalogue, problems = load_source(source)
    counts = count_table(catalogue, by=count_by, period=period)
    return Outcome({"counts": write_counts(counts, out_dir)}, problems)
