"""The alias table: which partner individuals are local ones, as confirmed by people; merged catalogues and counts.

Each team keeps its own IDs (`KZ-0007`, `TM-0031`). Only pairs a person confirms
enter the alias table, with who confirmed them and when. Nothing is renamed:
merged catalogues and counts read the alias table, so an animal known to both
teams counts once.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd

from reid.catalogue import COLUMN_NAMES
from reid.census import count_table
from reid.errors import Problem, ReidError
from reid.files import atomic_write

ALIAS_COLUMNS = (
    "local_id",
    "partner_id",
    "local_namespace",
    "partner_namespace",
    "score",
    "sides",
    "confirmed_by",
    "confirmed_at",
    "note",
)
CONFIRM_COLUMN = "confirmed"
"""The column of a reviewed candidates.csv where a person writes yes for each pair they confirm."""
YES = {"yes", "y", "true", "1", "x"}


def empty_aliases() -> pd.DataFrame:
    """Return an alias table with no rows."""
    return pd.DataFrame({c: pd.Series(dtype="string") for c in ALIAS_COLUMNS}).astype({"score": float})


def load_aliases(path: str | Path) -> pd.DataFrame:
    """Read the alias table (empty if the file does not exist yet)."""
    path = Path(path)
    if not path.exists():
        return empty_aliases()
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise ReidError(f"{path}: not a readable alias table ({err}); restore it from a backup") from err
    missing = [c for c in ALIAS_COLUMNS if c not in table.columns]
    if missing:
        raise ReidError(f"{path}: alias table without columns {missing}; restore it from a backup")
    table = table[list(ALIAS_COLUMNS)].replace("", pd.NA).astype("string")
    # The score is a record of the evidence, not a key: an unreadable one is kept as missing.
    table["score"] = pd.to_numeric(table["score"], errors="coerce")
    return table


def confirm_aliases(
    aliases_path: str | Path,
    reviewed: pd.DataFrame,
    *,
    confirmed_by: str,
    local_namespace: str,
    partner_namespace: str,
    note: str = "",
    when: datetime | None = None,
) -> tuple[pd.DataFrame, list[Problem]]:
    """Add the reviewed pairs marked confirmed (`confirmed` = yes) to the alias table; return it and what was skipped.

    A pair already recorded is skipped; an ID already aliased to another ID of the
    same partner catalogue is refused (one of the catalogues then holds one animal
    twice, which its keepers must resolve first). The table is written atomically.
    """
    if not str(confirmed_by).strip():
        raise ReidError('say who confirmed the pairs (confirmed_by="name"): the alias table records it')
    missing = [c for c in ("partner_id", "local_id", CONFIRM_COLUMN) if c not in reviewed.columns]
    if missing:
        raise ReidError(f"the reviewed pairs have no columns {missing}; use the candidates.csv written by mode=shared")
    aliases = load_aliases(aliases_path)
    stamp = (when or datetime.now(UTC)).isoformat(timespec="seconds")
    problems: list[Problem] = []
    rows = []
    confirmed = reviewed[reviewed[CONFIRM_COLUMN].fillna("").astype(str).str.strip().str.lower().isin(YES)]
    for pair in confirmed.itertuples(index=False):
        local_id, partner_id = str(pair.local_id), str(pair.partner_id)
        same_partner = aliases["partner_namespace"] == partner_namespace
        linked = aliases[same_partner & ((aliases["local_id"] == local_id) | (aliases["partner_id"] == partner_id))]
        if ((linked["local_id"] == local_id) & (linked["partner_id"] == partner_id)).any():
            problems.append(Problem(str(aliases_path), f"{local_id} = {partner_id}", "already recorded; skipped"))
            continue
        if len(linked):
            other = linked.iloc[0]
            raise ReidError(
                f"{local_id} = {partner_id} conflicts with the recorded {other['local_id']} = {other['partner_id']} "
                f"(confirmed by {other['confirmed_by']}); one catalogue holds one animal under two IDs: merge them "
                "there first, or correct the alias table"
            )
        rows.append(
            {
                "local_id": local_id,
                "partner_id": partner_id,
                "local_namespace": local_namespace,
                "partner_namespace": partner_namespace,
                "score": float(getattr(pair, "score", np.nan)),
                "sides": str(getattr(pair, "partner_sides", "")),
                "confirmed_by": str(confirmed_by),
                "confirmed_at": stamp,
                "note": note,
            }
        )
        aliases = pd.concat([aliases, pd.DataFrame([rows[-1]]).astype({"score": float})], ignore_index=True)
    if rows or not Path(aliases_path).exists():
        with atomic_write(aliases_path) as f:
            aliases.to_csv(f, index=False)
    return aliases, problems


def merged_catalogue(local: pd.DataFrame, partner: pd.DataFrame, aliases: pd.DataFrame) -> pd.DataFrame:
    """Return both catalogues' captures as one table where aliased individuals share one ID (the local one).

    Each partner ID with a confirmed alias is written as its local ID; the others
    keep their own namespaced IDs, so no two different animals share an ID and no
    ID is changed in either catalogue itself.
    """
    to_local = dict(zip(aliases["partner_id"].astype(str), aliases["local_id"].astype(str), strict=True))
    partner = partner[list(COLUMN_NAMES)].copy()
    partner["individual_id"] = pd.array(
        [to_local.get(str(i), i) if not pd.isna(i) else i for i in partner["individual_id"]], dtype="string"
    )
    clash = set(local["individual_id"].dropna()) & set(partner["individual_id"].dropna()) - set(to_local.values())
    if clash:
        raise ReidError(
            f"IDs {sorted(clash)[:5]} are used by both catalogues for animals not recorded as aliases; IDs must be "
            "namespaced by their catalogue (KZ-..., TM-...)"
        )
    return pd.concat([local[list(COLUMN_NAMES)], partner], ignore_index=True)


def merged_counts(
    local: pd.DataFrame, partner: pd.DataFrame, aliases: pd.DataFrame, *, by: Sequence[str] = ("country",)
) -> pd.DataFrame:
    """Return minimum/maximum counts for everything combined and per group, counting aliased animals once."""
    return count_table(merged_catalogue(local, partner, aliases), by=by)
