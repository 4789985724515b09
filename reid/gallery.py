"""The gallery of known individuals: embeddings searchable in FAISS plus one metadata row per entry.

On disk a gallery is a folder of plain files, versioned:

    gallery/
      CURRENT              name of the current version folder
      v000002/
        manifest.json      embedder fingerprint, sizes, times, counts, SHA-256 of every file
        entries.csv        catalogue columns + content_hash, one row per embedding
        embeddings.npy     (N, D) float32, L2-normalised (read with allow_pickle=False)

Every change writes a new version folder and then replaces CURRENT atomically, so
a killed enrol leaves the previous gallery intact; older versions are pruned.
Loading verifies every checksum and that the embedder in use is the one the
gallery was built with. The same image (by content hash) is never enrolled twice.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from reid.catalogue import BBOX_COLUMNS, COLUMN_NAMES, SIDES, build_catalogue
from reid.errors import Problem, ReidError
from reid.files import atomic_write, sha256_file
from reid.index import EmbeddingIndex, IndexKind

SCHEMA_VERSION = 1
CURRENT_FILE = "CURRENT"
MANIFEST_FILE = "manifest.json"
ENTRIES_FILE = "entries.csv"
EMBEDDINGS_FILE = "embeddings.npy"
KEEP_VERSIONS = 3
# Which gallery sides a query of each side is searched against: flanks differ, so never left against right.
SEARCHED_SIDES = {"left": ("left", "unknown"), "right": ("right", "unknown"), "unknown": SIDES}


class GalleryError(ReidError):
    """A gallery folder is missing, damaged, or belongs to another embedder."""


@dataclass
class Gallery:
    """Known individuals' flank embeddings with their metadata, searchable by side."""

    entries: pd.DataFrame
    """Catalogue columns + `content_hash`; row i describes embeddings[i]."""
    embeddings: np.ndarray
    """(N, D) float32, L2-normalised."""
    embedder_fingerprint: str
    index_kind: IndexKind = "flat"
    created: str = field(default_factory=lambda: _now())
    extra_files: dict[str, bytes] = field(default_factory=dict)
    """Further named files stored with the gallery (keypoint features, calibration)."""
    _indexes: dict[str, tuple[EmbeddingIndex, np.ndarray]] = field(default_factory=dict, repr=False)

    @classmethod
    def empty(cls, embedder_fingerprint: str, dim: int, index_kind: IndexKind = "flat") -> Gallery:
        """Return a gallery with no entries."""
        entries = build_catalogue([])[0].assign(content_hash=pd.Series(dtype="string"))
        return cls(entries, np.zeros((0, dim), np.float32), embedder_fingerprint, index_kind)

    @property
    def dim(self) -> int:
        """Return the embedding size D."""
        return int(self.embeddings.shape[1])

    def __len__(self) -> int:
        return len(self.entries)

    def add(self, entries: pd.DataFrame, embeddings: np.ndarray, content_hashes: list[str]) -> list[Problem]:
        """Enrol catalogue rows with their (N, D) embeddings and image SHA-256s; return what was skipped or changed.

        A row whose image content and box are already in the gallery (or earlier in
        this batch) is skipped and reported, never enrolled twice.
        """
        embeddings = np.asarray(embeddings, dtype=np.float32)
        if embeddings.ndim != 2 or embeddings.shape[1] != self.dim or len(embeddings) != len(entries):
            raise ReidError(
                f"embeddings must be ({len(entries)}, {self.dim}) for {len(entries)} entries, got {embeddings.shape}"
            )
        seen = {
            _entry_key(h, row)
            for h, (_, row) in zip(self.entries["content_hash"], self.entries.iterrows(), strict=True)
        }
        keep, problems = [], []
        for i, (digest, (_, row)) in enumerate(zip(content_hashes, entries.iterrows(), strict=True)):
            key = _entry_key(digest, row)
            if key in seen:
                problems.append(
                    Problem(
                        str(row["image_path"]), f"annotation {row['annotation_id']}", "already in the gallery; skipped"
                    )
                )
                continue
            seen.add(key)
            keep.append(i)
        added = entries.iloc[keep][list(COLUMN_NAMES)].copy()
        added["content_hash"] = pd.array([content_hashes[i] for i in keep], dtype="string")
        clash = added["annotation_id"].isin(set(self.entries["annotation_id"]))
        for i in np.flatnonzero(clash.to_numpy()).tolist():
            # IDs from different imports can collide; stored entries keep theirs, the new one is told its new ID.
            old = str(added["annotation_id"].iat[i])
            new = f"{old}@{str(added['content_hash'].iat[i])[:8]}"
            added.iat[i, list(added.columns).index("annotation_id")] = new
            problems.append(
                Problem(
                    str(added["image_path"].iat[i]),
                    f"annotation {old}",
                    f"ID already used in the gallery; enrolled as {new}",
                )
            )
        self.entries = (
            pd.concat([self.entries, added], ignore_index=True) if len(self.entries) else added.reset_index(drop=True)
        )
        self.embeddings = np.concatenate([self.embeddings, embeddings[keep]])
        self._indexes.clear()
        return problems

    def search(self, queries: np.ndarray, sides: list[str] | np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Return (scores, entry rows), both (Q, k): each query's best gallery entries of a matching side.

        A left query searches left (and unknown-side) entries, a right query right
        ones, an unknown-side query all. Missing neighbours have row -1, score -inf.
        """
        queries = np.asarray(queries, dtype=np.float32)
        sides = np.asarray(sides, dtype=object)
        scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
        rows = np.full((len(queries), k), -1, dtype=np.int64)
        for query_side, searched in SEARCHED_SIDES.items():
            mask = sides == query_side
            if not mask.any():
                continue
            found_scores, found_rows = [], []
            for side in searched:
                index, members = self._index_for(side)
                if len(members) == 0:
                    continue
                s, ids = index.search(queries[mask], k)
                found_scores.append(s)
                found_rows.append(np.where(ids >= 0, members[np.clip(ids, 0, None)], -1))
            if not found_scores:
                continue
            all_scores = np.concatenate(found_scores, axis=1)
            all_rows = np.concatenate(found_rows, axis=1)
            all_scores = np.where(all_rows >= 0, all_scores, -np.inf)
            order = np.argsort(-all_scores, axis=1, kind="stable")[:, :k]
            n = order.shape[1]
            scores[mask, :n] = np.take_along_axis(all_scores, order, axis=1)
            rows[mask, :n] = np.take_along_axis(all_rows, order, axis=1)
        rows[~np.isfinite(scores)] = -1
        return scores, rows

    def _index_for(self, side: str) -> tuple[EmbeddingIndex, np.ndarray]:
        if side not in self._indexes:
            members = np.flatnonzero((self.entries["side"] == side).to_numpy())
            index = EmbeddingIndex.build(self.embeddings[members], kind=self.index_kind)
            self._indexes[side] = (index, members)
        return self._indexes[side]

    def save(self, folder: str | Path) -> Path:
        """Write the gallery as a new version in `folder` and make it current; return the version folder."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        version = _next_version(folder)
        staging = folder / f".{version}.partial"
        if staging.exists():
            shutil.rmtree(staging)
        staging.mkdir()
        entries = self.entries.astype(object).where(self.entries.notna(), None)
        entries["timestamp"] = [t.isoformat() if t is not None else None for t in entries["timestamp"]]
        entries.to_csv(staging / ENTRIES_FILE, index=False)
        with open(staging / EMBEDDINGS_FILE, "wb") as f:
            np.save(f, np.ascontiguousarray(self.embeddings, dtype=np.float32), allow_pickle=False)
        for name, data in self.extra_files.items():
            (staging / name).write_bytes(data)
        names = [ENTRIES_FILE, EMBEDDINGS_FILE, *sorted(self.extra_files)]
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "version": version,
            "embedder_fingerprint": self.embedder_fingerprint,
            "embedding_dim": self.dim,
            "index_kind": self.index_kind,
            "created": self.created,
            "updated": _now(),
            "counts": {
                "entries": len(self.entries),
                "individuals": int(self.entries["individual_id"].nunique()),
                "sides": {s: int((self.entries["side"] == s).sum()) for s in SIDES},
            },
            "files": {name: sha256_file(staging / name) for name in names},
        }
        (staging / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))
        _fsync_tree(staging)
        os.replace(staging, folder / version)
        with atomic_write(folder / CURRENT_FILE) as f:
            f.write(version + "\n")
        _prune(folder, keep=KEEP_VERSIONS)
        return folder / version

    @classmethod
    def load(cls, folder: str | Path, *, embedder_fingerprint: str | None = None) -> Gallery:
        """Return the current version of the gallery in `folder`, verified.

        Raises GalleryError when files are missing or altered (checksums), or when
        `embedder_fingerprint` is given and differs from the gallery's.
        """
        folder = Path(folder)
        current = folder / CURRENT_FILE
        if not current.is_file():
            raise GalleryError(
                f"{folder}: no gallery here ({CURRENT_FILE} missing); build one with `python infer.py mode=build`"
            )
        version_dir = folder / current.read_text().strip()
        manifest_path = version_dir / MANIFEST_FILE
        try:
            manifest = json.loads(manifest_path.read_text())
        except (OSError, ValueError) as err:
            raise GalleryError(
                f"{manifest_path}: unreadable manifest ({err}); restore the gallery folder from a backup"
            ) from err
        if manifest.get("schema_version") != SCHEMA_VERSION:
            raise GalleryError(
                f"{manifest_path}: gallery schema {manifest.get('schema_version')!r}, this software reads {SCHEMA_VERSION}; "
                "rebuild the gallery or use the matching leopard-reid version"
            )
        for name in manifest["files"]:
            if not (version_dir / name).is_file():
                raise GalleryError(
                    f"{version_dir / name}: missing gallery file; restore the gallery folder from a backup"
                )
        for name, expected in manifest["files"].items():
            path = version_dir / name
            if sha256_file(path) != expected:
                raise GalleryError(
                    f"{path}: checksum mismatch, the file was altered or damaged; restore it from a backup"
                )
        if embedder_fingerprint is not None and embedder_fingerprint != manifest["embedder_fingerprint"]:
            raise GalleryError(
                f"{folder}: built with embedder {manifest['embedder_fingerprint'][:12]}, but the embedder in use is "
                f"{embedder_fingerprint[:12]}; use the embedder the gallery was built with, or rebuild the gallery "
                "with this one (`python infer.py mode=build`)"
            )
        raw = pd.read_csv(version_dir / ENTRIES_FILE, dtype=str, keep_default_na=False).replace("", None)
        entries, problems = build_catalogue(raw, first_line=2)
        if problems:
            raise GalleryError(f"{version_dir / ENTRIES_FILE}: {problems[0]}; restore the gallery folder from a backup")
        entries["content_hash"] = pd.Series(raw["content_hash"].tolist(), dtype="string")
        try:
            with open(version_dir / EMBEDDINGS_FILE, "rb") as f:
                embeddings = np.load(f, allow_pickle=False)
        except ValueError as err:
            raise GalleryError(
                f"{version_dir / EMBEDDINGS_FILE}: not a plain float array ({err}); rebuild the gallery"
            ) from err
        if embeddings.shape != (len(entries), manifest["embedding_dim"]):
            raise GalleryError(f"{version_dir}: {len(entries)} entries but embeddings of shape {embeddings.shape}")
        extra = {
            name: (version_dir / name).read_bytes()
            for name in manifest["files"]
            if name not in (ENTRIES_FILE, EMBEDDINGS_FILE)
        }
        return cls(
            entries=entries,
            embeddings=embeddings.astype(np.float32, copy=False),
            embedder_fingerprint=manifest["embedder_fingerprint"],
            index_kind=manifest.get("index_kind", "flat"),
            created=manifest["created"],
            extra_files=extra,
        )


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """Return the current version's manifest (no verification)."""
    folder = Path(folder)
    version = (folder / CURRENT_FILE).read_text().strip()
    return json.loads((folder / version / MANIFEST_FILE).read_text())


def _entry_key(content_hash: str, row: pd.Series) -> str:
    # One image may hold two animals: the box is part of what makes an entry unique.
    box = [row[c] for c in BBOX_COLUMNS]
    where = "full" if any(pd.isna(v) for v in box) else ",".join(f"{float(v):g}" for v in box)
    return f"{content_hash}:{where}"


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _next_version(folder: Path) -> str:
    numbers = [int(p.name[1:]) for p in folder.glob("v[0-9]*") if p.is_dir() and p.name[1:].isdigit()]
    return f"v{max(numbers, default=0) + 1:06d}"


def _prune(folder: Path, keep: int) -> None:
    current = (folder / CURRENT_FILE).read_text().strip()
    versions = sorted(p for p in folder.glob("v[0-9]*") if p.is_dir() and p.name[1:].isdigit())
    for old in versions[:-keep]:
        if old.name != current:
            shutil.rmtree(old, ignore_errors=True)
    for partial in folder.glob(".v*.partial"):
        shutil.rmtree(partial, ignore_errors=True)


def _fsync_tree(folder: Path) -> None:
    for path in folder.iterdir():
        with open(path, "rb") as f:
            os.fsync(f.fileno())
