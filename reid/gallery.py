"""The gallery of known individuals: embeddings searchable in FAISS plus one metadata row per entry.

On disk a gallery is a folder of plain files, versioned:

    gallery/
      CURRENT              name of the current version folder
      v000002/
        manifest.json      embedder fingerprint, sizes, times, counts, SHA-256 of every file
        entries.csv        catalogue columns + content_hash, one row per embedding
        embeddings.npy     (N, D) float32, L2-normalised (read with allow_pickle=False)
        keypoints.npz      optional: every entry's keypoint features and their settings (plain arrays)
        fusion.json        optional: how scores are made and calibrated (`reid.fusion.ScoreFusion`)
        thresholds.json    optional: the calibrated decision thresholds (`reid.decisions.Thresholds`)

The `Gallery` type is the one owner of these files: the optional ones are read and
written through its `keypoints`, `fusion` and `thresholds` properties.

Every change writes a new version folder and then replaces CURRENT atomically, so
a killed enrol leaves the previous gallery intact; older versions are pruned, but
never one newer than the current version nor one holding entries the current
version lacks. Loading verifies every checksum and that the embedder in use is the
one the gallery was built with. The same image (by content hash) is never enrolled
twice.

One run at a time changes a gallery: a run that extends it holds `gallery_lock`
(a LOCK file naming its pid) from before `Gallery.load` until after `Gallery.save`,
and `save` refuses to commit over a version other than the one the gallery was
loaded from, so two runs can never each add a batch to the same version and lose
one of them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple, get_args

import numpy as np
import pandas as pd

from reid.catalogue import BBOX_COLUMNS, COLUMN_NAMES, SEARCHED_SIDES, SIDES, build_catalogue
from reid.decisions import Thresholds
from reid.errors import Problem, ReidError, quoting_hint
from reid.files import atomic_write, sha256_file
from reid.fusion import ScoreFusion
from reid.index import EmbeddingIndex, IndexKind
from reid.keypoints import Features, KeypointConfig, features_from_bytes, features_to_bytes

SCHEMA_VERSION = 1
CURRENT_FILE = "CURRENT"
MANIFEST_FILE = "manifest.json"
ENTRIES_FILE = "entries.csv"
EMBEDDINGS_FILE = "embeddings.npy"
THRESHOLDS_FILE = "thresholds.json"
FUSION_FILE = "fusion.json"
KEYPOINTS_FILE = "keypoints.npz"
LOCK_FILE = "LOCK"
KEEP_VERSIONS = 3
# A commit (write a version, switch CURRENT) takes seconds; a save waits this long for another run's commit.
COMMIT_WAIT_S = 60.0


class GalleryError(ReidError):
    """A gallery folder is missing, damaged, or belongs to another embedder."""


class StoredKeypoints(NamedTuple):
    """Keypoint features of every gallery entry (aligned with its rows) and the settings they were made with."""

    features: Sequence[Features]
    config: KeypointConfig


@dataclass
class Gallery:
    """Known individuals' flank embeddings with their metadata, searchable by side."""

    entries: pd.DataFrame
    """Catalogue columns + `content_hash`; row i describes embeddings[i]."""
    embeddings: np.ndarray
    """(N, D) float32, L2-normalised."""
    embedder_fingerprint: str
    index_kind: IndexKind = "flat"
    created: str = field(default_factory=lambda: _now("microseconds"))
    """When the gallery was first built; to the microsecond, so that it tells two galleries apart (`identity`)."""
    extra_files: dict[str, bytes] = field(default_factory=dict)
    """Further named files stored with the gallery (keypoint features, calibration)."""
    _indexes: dict[str, tuple[EmbeddingIndex, np.ndarray]] = field(default_factory=dict, repr=False)
    _origin: tuple[str, str] | None = field(default=None, repr=False, compare=False)
    _decoded_keypoints: tuple[bytes, StoredKeypoints] | None = field(default=None, repr=False, compare=False)
    """keypoints.npz decoded once: (the bytes it was decoded from, the features)."""
    """(resolved folder, version) this gallery was loaded from or last saved as; None for a new gallery."""

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

    @property
    def thresholds(self) -> Thresholds | None:
        """Return the decision thresholds calibrated for this gallery, or None before calibration."""
        data = self.extra_files.get(THRESHOLDS_FILE)
        return None if data is None else Thresholds.from_json(data)

    @thresholds.setter
    def thresholds(self, value: Thresholds) -> None:
        self.extra_files[THRESHOLDS_FILE] = value.to_json().encode()

    @property
    def fusion(self) -> ScoreFusion:
        """Return the score fusion calibrated for this gallery (embedding alone before calibration)."""
        data = self.extra_files.get(FUSION_FILE)
        return ScoreFusion() if data is None else ScoreFusion.from_json(data)

    @fusion.setter
    def fusion(self, value: ScoreFusion) -> None:
        self.extra_files[FUSION_FILE] = value.to_json().encode()

    @property
    def keypoints(self) -> StoredKeypoints | None:
        """Return the entries' stored keypoint features (one per entry) and their settings, or None if it has none."""
        data = self.extra_files.get(KEYPOINTS_FILE)
        if data is None:
            return None
        if self._decoded_keypoints is not None and self._decoded_keypoints[0] is data:
            return self._decoded_keypoints[1]
        features, config = features_from_bytes(data)
        if len(features) != len(self):
            raise GalleryError(
                f"the gallery's {KEYPOINTS_FILE} has features of {len(features)} entries, but it has {len(self)}; "
                "rebuild the gallery (`python infer.py mode=build`)"
            )
        self._decoded_keypoints = (data, StoredKeypoints(features, config))
        return self._decoded_keypoints[1]

    @keypoints.setter
    def keypoints(self, value: StoredKeypoints) -> None:
        if len(value.features) != len(self):
            raise GalleryError(f"keypoint features of {len(value.features)} entries for a gallery of {len(self)}")
        self.extra_files[KEYPOINTS_FILE] = features_to_bytes(list(value.features), value.config)

    def require_keypoints(
        self, fusion: ScoreFusion, configured: KeypointConfig | None = None
    ) -> StoredKeypoints | None:
        """Return the stored keypoint features when `fusion` uses them (None when it does not); raise if missing.

        With `configured` (the run's keypoint settings), features made by another matcher are refused: scores of
        one matcher are calibrated on its own scale, and its descriptors cannot be compared with another's.
        """
        if not fusion.uses_keypoints:
            return None
        stored = self.keypoints
        if stored is None:
            raise GalleryError(
                f"score method {fusion.method} needs the gallery's keypoint features; rebuild the gallery with "
                "keypoints enabled (`python infer.py mode=build keypoints.method=rootsift`)"
            )
        check_same_matcher(stored.config, configured)
        return stored

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
            entry_key(h, row) for h, (_, row) in zip(self.entries["content_hash"], self.entries.iterrows(), strict=True)
        }
        keep, problems = [], []
        for i, (digest, (_, row)) in enumerate(zip(content_hashes, entries.iterrows(), strict=True)):
            key = entry_key(digest, row)
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

    @property
    def version(self) -> str | None:
        """Return the version folder name this gallery was loaded from or last saved as, None for a new gallery."""
        return self._origin[1] if self._origin else None

    @property
    def folder(self) -> Path | None:
        """Return the folder this gallery was loaded from or last saved in, None for a new gallery."""
        return Path(self._origin[0]) if self._origin else None

    @property
    def identity(self) -> str:
        """Return what every version of this gallery shares: when it was first built, and by which embedder."""
        return f"{self.created}/{self.embedder_fingerprint[:12]}"

    def save(self, folder: str | Path, *, replace: bool = False) -> Path:
        """Write the gallery as a new version in `folder` and make it current; return the version folder.

        Refuses (GalleryError, nothing written) when the folder's current version is
        no longer the one this gallery was loaded from (another run saved meanwhile)
        or, for a new gallery, when the folder already holds one; `replace` lifts
        that check (an import replacing a partner's catalogue). Holds `gallery_lock`
        while committing, waiting up to COMMIT_WAIT_S for another run's lock.
        """
        folder = Path(folder)
        with gallery_lock(folder, wait_s=COMMIT_WAIT_S):
            on_disk = current_version(folder)
            based_on = self._origin[1] if self._origin and self._origin[0] == _key(folder) else None
            if on_disk != based_on and not replace:
                raise GalleryError(
                    f"the gallery {folder} was changed by another run while this one worked (it was "
                    f"{based_on or 'empty'} when this run loaded it, it is {on_disk} now); nothing was saved: "
                    "run again to add to the new version"
                )
            version = _next_version(folder)
            staging = folder / f".{version}.partial"
            if staging.exists():
                shutil.rmtree(staging)
            staging.mkdir()
            (staging / ENTRIES_FILE).write_bytes(entries_to_csv(self.entries))
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
            self._origin = (_key(folder), version)
            _prune(folder, keep=KEEP_VERSIONS)
        return folder / version

    @classmethod
    def load(cls, folder: str | Path, *, embedder_fingerprint: str | None = None) -> Gallery:
        """Return the current version of the gallery in `folder`, verified.

        Raises GalleryError when there is no gallery, when CURRENT is missing but
        versions are there (listing them), when the manifest is damaged or files are
        missing or altered (checksums), or when `embedder_fingerprint` is given and
        differs from the gallery's.
        """
        folder = Path(folder)
        if folder.exists() and not folder.is_dir():
            raise GalleryError(f"{folder}: is a file, not a gallery folder; give the gallery's folder")
        version = current_version(folder)
        if version is None:
            raise GalleryError(
                f"{folder}: no gallery here ({CURRENT_FILE} missing); build one with `python infer.py mode=build`"
                + quoting_hint(folder)
            )
        version_dir = folder / version
        if not _VERSION_NAME.fullmatch(version) or not version_dir.is_dir():
            raise GalleryError(
                f"{folder / CURRENT_FILE} names version {version!r}, which is not in the folder; "
                f"{_choose_version_hint(folder)}"
            )
        manifest_path = version_dir / MANIFEST_FILE
        try:
            manifest = json.loads(manifest_path.read_text())
        except (OSError, ValueError, RecursionError) as err:
            raise GalleryError(
                f"{manifest_path}: unreadable manifest ({err}); restore the gallery folder from a backup"
            ) from err
        if isinstance(manifest, dict) and "schema_version" in manifest and manifest["schema_version"] != SCHEMA_VERSION:
            raise GalleryError(
                f"{manifest_path}: gallery schema {manifest.get('schema_version')!r}, this software reads {SCHEMA_VERSION}; "
                "rebuild the gallery or use the matching leopard-reid version"
            )
        damage = _manifest_damage(manifest)
        if damage:
            raise GalleryError(
                f"{version_dir}: {MANIFEST_FILE} is damaged: {damage}; restore the gallery folder from a backup"
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
        raw = pd.read_csv(version_dir / ENTRIES_FILE, dtype=str, keep_default_na=False)
        entries, problems = entries_from_table(raw)
        if problems:
            raise GalleryError(f"{version_dir / ENTRIES_FILE}: {problems[0]}; restore the gallery folder from a backup")
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
            _origin=(_key(folder), version),
        )


def check_same_matcher(stored: KeypointConfig, configured: KeypointConfig | None) -> None:
    """Raise GalleryError when the run's keypoint matcher is not the one the gallery's features were made with."""
    if configured is None or configured.method == stored.method:
        return
    raise GalleryError(
        f"the gallery's keypoint features were made with keypoints.method={stored.method}, but this run sets "
        f"keypoints.method={configured.method}; run with keypoints.method={stored.method} (or the matching preset "
        f"that uses it), or build a new gallery with {configured.method} (`python infer.py mode=build "
        "gallery=<new folder>`)"
    )


def current_version(folder: str | Path) -> str | None:
    """Return the name of the folder's current version, None when the folder holds no gallery.

    Raises GalleryError for a folder that holds versions but no CURRENT file,
    listing them: starting an empty gallery there would hide them, and pruning
    would later delete them.
    """
    folder = Path(folder)
    current = folder / CURRENT_FILE
    if current.is_file():
        return current.read_text().strip()
    if _versions(folder):
        raise GalleryError(f"{folder}: {CURRENT_FILE} is missing but {_choose_version_hint(folder)}")
    return None


@contextmanager
def gallery_lock(folder: str | Path, *, wait_s: float = 0.0) -> Iterator[Path]:
    """Hold the writer lock of the gallery in `folder` (created if absent) for the block; yield the lock file.

    A run that changes a gallery holds the lock from before it loads the gallery
    until after it saves it, so no other run commits in between. Raises
    GalleryError naming the run that holds it (pid, start time) when it is still
    held after `wait_s` seconds. A lock left behind by a run that died on this
    machine is removed. Re-entrant in one process: `Gallery.save` takes it too.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise GalleryError(
            f"{folder}: is a file, not a gallery folder; give the name of a gallery folder (new or existing)"
        )
    key = _key(folder)
    thread = threading.get_ident()
    with _HELD_GUARD:
        owner, depth = _HELD.get(key, (thread, 0))
        if owner == thread and depth:
            _HELD[key] = (thread, depth + 1)
            reentered = True
        else:
            reentered = False
    lock = folder / LOCK_FILE
    if reentered:
        try:
            yield lock
        finally:
            _release_held(key)
        return
    folder.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex
    deadline = time.monotonic() + wait_s
    while True:
        held_by = _try_lock(lock, token)
        if held_by is None:
            break
        if time.monotonic() >= deadline:
            pid = held_by.get("pid", "unknown")
            since = held_by.get("since", "an unknown time")
            host = held_by.get("host")
            elsewhere = f" on {host}" if host and host != socket.gethostname() else ""
            raise GalleryError(
                f"the gallery {folder} is being changed by another run (pid {pid}{elsewhere}, since {since}); "
                f"wait for it to finish, or delete {lock} if no such run exists"
            )
        time.sleep(min(0.2, max(deadline - time.monotonic(), 0.01)))
    with _HELD_GUARD:
        _HELD[key] = (thread, 1)
    try:
        yield lock
    finally:
        _release_held(key)
        if _lock_info(lock).get("token") == token:
            lock.unlink(missing_ok=True)


def entries_to_csv(entries: pd.DataFrame) -> bytes:
    """Return gallery entries (catalogue columns + content_hash) as the CSV bytes of entries.csv."""
    out = entries.astype(object).where(entries.notna(), None)
    out["timestamp"] = [t.isoformat() if t is not None else None for t in out["timestamp"]]
    return out.to_csv(index=False).encode()


def entries_from_table(raw: pd.DataFrame) -> tuple[pd.DataFrame, list[Problem]]:
    """Return the typed gallery entries of an entries.csv read as strings, and its invalid rows (named by line)."""
    entries, problems = build_catalogue(raw.replace("", None), first_line=2)
    entries["content_hash"] = pd.Series(raw["content_hash"].tolist(), dtype="string")
    return entries, problems


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """Return the current version's manifest (no verification)."""
    folder = Path(folder)
    version = (folder / CURRENT_FILE).read_text().strip()
    manifest: dict[str, Any] = json.loads((folder / version / MANIFEST_FILE).read_text())
    return manifest


def entry_key(content_hash: str, row: pd.Series) -> str:
    """Return what makes a gallery entry unique: its image's content and its box."""
    # One image may hold two animals: the box is part of what makes an entry unique.
    box = [row[c] for c in BBOX_COLUMNS]
    where = "full" if any(pd.isna(v) for v in box) else ",".join(f"{float(v):g}" for v in box)
    return f"{content_hash}:{where}"


def _now(timespec: str = "seconds") -> str:
    return datetime.now(UTC).isoformat(timespec=timespec)


def _next_version(folder: Path) -> str:
    numbers = [int(p.name[1:]) for p in folder.glob("v[0-9]*") if p.is_dir() and p.name[1:].isdigit()]
    return f"v{max(numbers, default=0) + 1:06d}"


def _prune(folder: Path, keep: int) -> None:
    """Remove versions older than the newest `keep` up to the current one, but only those whose entries it holds.

    A version newer than the current one (CURRENT was set back by hand) is never
    removed, nor one with an entry the current version lacks: pruning never
    deletes the only copy of an entry.
    """
    current = (folder / CURRENT_FILE).read_text().strip()
    if not _VERSION_NAME.fullmatch(current):
        return
    older = [p for p in _versions(folder) if int(p.name[1:]) < int(current[1:])]
    candidates = older[: max(len(older) - (keep - 1), 0)]
    if candidates:
        held = _stored_entry_keys(folder / current)
        for old in candidates:
            keys = _stored_entry_keys(old)
            if held is not None and keys is not None and keys <= held:
                shutil.rmtree(old, ignore_errors=True)
    for partial in folder.glob(".v*.partial"):
        shutil.rmtree(partial, ignore_errors=True)


def _stored_entry_keys(version_dir: Path) -> set[str] | None:
    """Return the entry keys (content hash and box) of a saved version, None when its entries cannot be read."""
    try:
        raw = pd.read_csv(version_dir / ENTRIES_FILE, dtype=str, keep_default_na=False)
        return {
            entry_key(row["content_hash"], row.replace("", np.nan))
            for _, row in raw[["content_hash", *BBOX_COLUMNS]].iterrows()
        }
    except (OSError, ValueError, KeyError, pd.errors.ParserError, pd.errors.EmptyDataError):
        return None


def _versions(folder: Path) -> list[Path]:
    """Return the folder's version folders, oldest first."""
    if not folder.is_dir():
        return []
    return sorted(
        (p for p in folder.iterdir() if _VERSION_NAME.fullmatch(p.name) and p.is_dir()), key=lambda p: int(p.name[1:])
    )


def _choose_version_hint(folder: Path) -> str:
    """Return the versions a folder holds (entries, last update) and how to choose one, as one clause."""
    versions = _versions(folder)
    if not versions:
        return f"the folder holds no gallery versions; restore {folder} from a backup"
    described = []
    for path in versions[-5:]:
        try:
            manifest = json.loads((path / MANIFEST_FILE).read_text())
            described.append(f"{path.name} ({manifest['counts']['entries']} entries, {manifest['updated']})")
        except (OSError, ValueError, RecursionError, KeyError, TypeError):
            described.append(f"{path.name} (manifest unreadable)")
    more = f" and {len(versions) - 5} older" if len(versions) > 5 else ""
    return (
        f"the folder holds gallery versions {', '.join(described)}{more}; choose one by writing its name into "
        f"{folder / CURRENT_FILE} (the newest, {versions[-1].name}, unless you know it is wrong), then run again"
    )


def _manifest_damage(manifest: Any) -> str | None:
    """Return what is wrong with a loaded manifest.json (a missing key, a wrong type, an odd file name), or None."""
    if not isinstance(manifest, dict):
        return f"it holds {type(manifest).__name__}, not a JSON object"
    expected: dict[str, tuple[type, str]] = {
        "schema_version": (int, "a whole number"),
        "embedder_fingerprint": (str, "text"),
        "embedding_dim": (int, "a whole number"),
        "created": (str, "a time as text"),
        "files": (dict, "a mapping of file names to SHA-256 checksums"),
    }
    for key, (kind, described) in expected.items():
        if key not in manifest:
            return f"{key!r} is missing"
        value = manifest[key]
        if not isinstance(value, kind) or isinstance(value, bool):
            return f"{key!r} is {_shown(value)}, not {described}"
    if manifest["embedding_dim"] < 1:
        return f"'embedding_dim' is {manifest['embedding_dim']}, not a positive number"
    if "index_kind" in manifest and manifest["index_kind"] not in get_args(IndexKind):
        return f"'index_kind' is {_shown(manifest['index_kind'])}, not one of {', '.join(get_args(IndexKind))}"
    for name, digest in manifest["files"].items():
        if not _FILE_NAME.fullmatch(name):
            return f"'files' names {name!r}, which is not a plain file name"
        if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
            return f"'files' gives {name!r} the checksum {_shown(digest)}, not a SHA-256"
    for name in (ENTRIES_FILE, EMBEDDINGS_FILE):
        if name not in manifest["files"]:
            return f"'files' does not list {name}"
    return None


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _key(folder: Path) -> str:
    return str(folder.resolve())


def _release_held(key: str) -> None:
    with _HELD_GUARD:
        owner, depth = _HELD[key]
        if depth > 1:
            _HELD[key] = (owner, depth - 1)
        else:
            del _HELD[key]


def _try_lock(lock: Path, token: str) -> dict[str, Any] | None:
    """Create the lock file; return None when it is ours, else what the lock file says about its holder."""
    info = {"pid": os.getpid(), "host": socket.gethostname(), "since": _now(), "token": token}
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            held = _lock_info(lock)
            if held and _holder_is_gone(held):
                _break_stale(lock, held)
                continue
            return held
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(info))
        return None
    return _lock_info(lock)


def _lock_info(lock: Path) -> dict[str, Any]:
    try:
        info = json.loads(lock.read_text())
    except (OSError, ValueError, RecursionError):
        return {}
    return info if isinstance(info, dict) else {}


def _holder_is_gone(held: dict[str, Any]) -> bool:
    """Return True when the lock's run is known to be dead: same machine, and its pid gone or reused since."""
    pid = held.get("pid")
    if held.get("host") != socket.gethostname() or not isinstance(pid, int) or pid <= 0 or os.name != "posix":
        # Only a process on this machine can be checked; on Windows os.kill(pid, 0) would end the process.
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    started = _process_start(pid)
    try:
        since = datetime.fromisoformat(str(held.get("since"))).timestamp()
    except ValueError:
        return False
    # A process that started after the lock was taken has only inherited the dead holder's pid.
    return started is not None and started > since + 2


def _process_start(pid: int) -> float | None:
    """Return when a process started (Unix time) on Linux, else None."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        boot = next(
            float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines() if line.startswith("btime")
        )
        return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def _break_stale(lock: Path, held: dict[str, Any]) -> None:
    """Remove a dead run's lock file without ever removing a lock another run has just taken."""
    aside = lock.with_name(f"{LOCK_FILE}.stale-{uuid.uuid4().hex}")
    try:
        os.rename(lock, aside)
    except OSError:
        return  # another run broke it first
    if _lock_info(aside).get("token") != held.get("token"):
        # Between reading and renaming, another run broke the stale lock and took it: give it back.
        with suppress(OSError):
            os.link(aside, lock)
    aside.unlink(missing_ok=True)


_VERSION_NAME = re.compile(r"v[0-9]{6,}")
_FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
# Folders whose lock this process holds: resolved path -> (thread, depth), so Gallery.save can re-enter.
_HELD: dict[str, tuple[int, int]] = {}
_HELD_GUARD = threading.Lock()


def _fsync_tree(folder: Path) -> None:
    for path in folder.iterdir():
        with open(path, "rb") as f:
            os.fsync(f.fileno())
