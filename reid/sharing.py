"""Portable catalogue archives: export a gallery for a partner team, import a partner's archive safely.

An archive is one .tar.gz:

    manifest.json      format and schema versions, owner (organisation + ID namespace), embedder,
                       software version, creation time (UTC), counts, coordinate precision,
                       and the SHA-256 of every other file
    entries.csv        the gallery's entry rows (catalogue columns + content_hash); coordinates generalised
    embeddings.npy     (N, D) float32, row i for entry i
    extra/<name>       the gallery's extra files (thresholds.json, fusion.json, keypoints.npz, ...)
    crops.csv          only with crops: annotation_id -> crops/<row>.jpg
    crops/<row>.jpg    only with crops: flank crops, so the partner can re-embed with their own embedder

An archive comes from another organisation, so import trusts nothing in it: every
member is checked (type, name, size, checksum, content; nothing is ever unpickled,
and a member that is a pickle of any protocol is refused, whatever its name) in a
temporary folder outside the destination, and the destination is written only
after every check has passed. Before anything is unpacked, the sizes in the
members' headers may add up to at most 100 times the archive's size (at least
256 MB, at most 16 GB): a compression bomb is refused without filling the disk. An import goes into its own folder:

    dest_dir/<namespace>/
      IMPORTED.json    owner (organisation + namespace) and the history of imports
      CURRENT, v.../   a normal versioned gallery: Gallery.load reads it
      imports/v.../    per gallery version: the archive's manifest.json, crops.csv, crops/*.jpg

The import never writes outside dest_dir/<namespace>, so a local catalogue is never
overwritten or renumbered; a folder holding anything else is refused.
"""

from __future__ import annotations

import hashlib
import io
import json
import pickletools
import re
import shutil
import tarfile
import tempfile
import warnings
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any, cast, get_args

import numpy as np
import pandas as pd
from PIL import Image
from tqdm import tqdm

import reid
from reid.catalogue import (
    BBOX_COLUMNS,
    COLUMN_NAMES,
    SIDES,
    generalise_coordinates,
    load_catalogue,
    save_catalogue,
)
from reid.errors import Problem, ReidError, report
from reid.files import atomic_write, sha256_file
from reid.gallery import (
    CURRENT_FILE,
    EMBEDDINGS_FILE,
    ENTRIES_FILE,
    LOCK_FILE,
    MANIFEST_FILE,
    Gallery,
    entries_from_table,
    entries_to_csv,
    gallery_lock,
)
from reid.gallery import SCHEMA_VERSION as GALLERY_SCHEMA_VERSION
from reid.images import ImageReadError, image_size, read_image
from reid.index import IndexKind

ARCHIVE_FORMAT = "leopard-reid catalogue archive"
ARCHIVE_SCHEMA_VERSION = 1
CROPS_INDEX_FILE = "crops.csv"
CROPS_DIR = "crops"
EXTRA_DIR = "extra"
MARKER_FILE = "IMPORTED.json"
IMPORTS_DIR = "imports"
EXTRA_SUFFIXES = (".json", ".npz", ".npy", ".csv", ".txt")
PICKLE_SUFFIXES = (".pkl", ".pickle", ".pt", ".pth", ".joblib", ".ckpt", ".sav", ".dill")
CROP_JPEG_QUALITY = 92
# Far above any real catalogue (100k entries x 1024-D float32 is 400 MB), far below what fills a disk.
MAX_MEMBERS = 500_000
MAX_MEMBER_BYTES = 2 << 30
MAX_TOTAL_BYTES = 16 << 30
MAX_MANIFEST_BYTES = 64 << 20
# A gzip bomb unpacks to thousands of times its size; a real archive (embeddings, JPEG crops, CSV) to a few
# times. The members' sizes, read from their headers before anything is written, may add up to at most
# MAX_EXPANSION x the archive's size (at least MIN_UNPACKED_ALLOWANCE, at most MAX_TOTAL_BYTES).
MAX_EXPANSION = 100
MIN_UNPACKED_ALLOWANCE = 256 << 20

_NAMESPACE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,31}")
_EXTRA_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
_CROP_NAME = re.compile(CROPS_DIR + r"/[0-9]{6,9}\.jpg")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_FIXED_NAMES = (MANIFEST_FILE, ENTRIES_FILE, EMBEDDINGS_FILE, CROPS_INDEX_FILE)
_DIRECTORIES = (CROPS_DIR, EXTRA_DIR)
_CROPS_INDEX_COLUMNS = ["annotation_id", "file"]

ASK_NEW_EXPORT = (
    "do not use this archive; ask the sender for a new export made with leopard-reid's export_catalogue, "
    "sent exactly as written (not unpacked and re-packed)"
)
ASK_RESEND = "the archive is damaged or incomplete; ask the sender to send it again and compare its SHA-256 with theirs"


class ArchiveError(ReidError):
    """A catalogue archive that cannot be written or safely imported, naming the member and what to ask for."""

    def __init__(self, archive: str | Path, member: str, problem: str, ask: str) -> None:
        where = f" member {member!r}" if member else ""
        super().__init__(f"{archive}{where}: {problem}; {ask}")
        self.archive, self.member, self.problem = str(archive), member, problem


@dataclass
class ImportedCatalogue:
    """A partner's catalogue after import: its gallery, the archive's manifest and where both now live."""

    gallery: Gallery
    manifest: dict[str, Any]
    """The archive's manifest.json, as received."""
    folder: Path
    """dest_dir/<namespace>: a versioned gallery folder (Gallery.load reads it)."""
    version_dir: Path
    """The gallery version this import wrote."""
    crops: pd.DataFrame | None
    """Catalogue table of the shipped flank crops (image_path = extracted crop, box empty), or None."""


def export_catalogue(
    gallery_dir: str | Path,
    out_path: str | Path,
    *,
    organisation: str,
    namespace: str,
    precision_deg: float = 0.1,
    exact_coordinates: bool = False,
    crops: bool = False,
    crop_max_side_px: int = 512,
    progress: bool = True,
) -> Path:
    """Write the current gallery in `gallery_dir` as one .tar.gz archive for a partner; return its path.

    Entry rows and embeddings are exported unchanged, except latitude/longitude,
    which are rounded to `precision_deg` unless `exact_coordinates` is asked for.
    With `crops`, each entry's flank crop (shrunk to `crop_max_side_px`) is shipped
    too; an image that cannot be read is reported and left out. The archive is
    written to a temporary file beside `out_path` and renamed when complete.
    """
    out_path = Path(out_path)
    _check_owner(organisation, namespace, out_path, "pass organisation= and namespace= (such as KZ or TM)")
    if crop_max_side_px < 1:
        raise ArchiveError(out_path, "", f"crop_max_side_px must be at least 1, got {crop_max_side_px}", "fix it")
    gallery = Gallery.load(gallery_dir)
    entries = gallery.entries
    coordinates: dict[str, Any]
    if exact_coordinates:
        coordinates = {"generalised": False, "precision_deg": "exact", "uncertainty_m": "exact"}
    else:
        entries, uncertainty_m = generalise_coordinates(entries, precision_deg)
        coordinates = {"generalised": True, "precision_deg": precision_deg, "uncertainty_m": uncertainty_m}
    files = {ENTRIES_FILE: entries_to_csv(entries), EMBEDDINGS_FILE: _npy(gallery.embeddings)}
    for name, data in sorted(gallery.extra_files.items()):
        member = f"{EXTRA_DIR}/{name}"
        problem = _name_problem(member) or _content_problem(member, data)
        if problem:
            raise ArchiveError(
                out_path,
                member,
                f"the gallery's extra file {name!r} cannot be shared: {problem}",
                f"give it a plain name ending in one of {', '.join(EXTRA_SUFFIXES)} and content without pickles",
            )
        files[member] = data

    created = _now()
    digests: dict[str, str] = {}
    crop_counts: dict[str, Any] | None = None
    with atomic_write(out_path, "wb") as f, tarfile.open(fileobj=f, mode="w:gz", format=tarfile.PAX_FORMAT) as tar:

        def add(name: str, data: bytes) -> None:
            _add_member(tar, name, data, created)
            digests[name] = hashlib.sha256(data).hexdigest()

        for name, data in files.items():
            add(name, data)
        if crops:
            index, problems = _add_crops(gallery.entries, add, crop_max_side_px, progress)
            add(CROPS_INDEX_FILE, pd.DataFrame(index, columns=_CROPS_INDEX_COLUMNS).to_csv(index=False).encode())
            report(problems, what="exporting flank crops")
            crop_counts = {"count": len(index), "skipped": len(problems), "max_side_px": crop_max_side_px}
        manifest = {
            "format": ARCHIVE_FORMAT,
            "archive_schema_version": ARCHIVE_SCHEMA_VERSION,
            "organisation": organisation,
            "namespace": namespace,
            "created": created,
            "software_version": software_version(),
            "gallery_schema_version": GALLERY_SCHEMA_VERSION,
            "gallery_version": gallery.version,
            "gallery_created": gallery.created,
            "embedder_fingerprint": gallery.embedder_fingerprint,
            "embedding_dim": gallery.dim,
            "index_kind": gallery.index_kind,
            "counts": {
                "entries": len(entries),
                "individuals": int(entries["individual_id"].nunique()),
                "sides": {s: int((entries["side"] == s).sum()) for s in SIDES},
            },
            "coordinates": coordinates,
            "crops": crop_counts,
            "files": digests,
        }
        # Last, because it lists the checksum of every other member.
        _add_member(tar, MANIFEST_FILE, json.dumps(manifest, indent=2).encode(), created)
    return out_path


def import_catalogue(archive: str | Path, dest_dir: str | Path, *, progress: bool = True) -> ImportedCatalogue:
    """Check a partner's archive and add it as a new gallery version in dest_dir/<namespace>.

    Raises ArchiveError (naming the archive, the member and what to ask the sender
    for) when anything is unsafe, damaged, unlisted or of an unknown schema, and
    then leaves `dest_dir` exactly as it was.
    """
    archive, dest_dir = Path(archive), Path(dest_dir)
    with tempfile.TemporaryDirectory(prefix="leopard-import-") as tmp:
        staged = _extract_checked(archive, Path(tmp), progress)
        manifest = _verified_manifest(archive, staged)
        gallery = _gallery_from(archive, staged, manifest)
        crops_index = _crops_index(archive, staged, gallery.entries)
        folder, _ = _target_folder(archive, dest_dir, manifest)
        created = not folder.exists()
        try:
            with gallery_lock(folder):
                # Again under the lock: another import into the same folder may have finished meanwhile.
                folder, marker = _target_folder(archive, dest_dir, manifest)
                # Every check has passed: from here on, dest_dir/<namespace> is written.
                return _install(archive, folder, marker, manifest, staged, gallery, crops_index)
        except BaseException:
            if created and folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
            raise


def load_imported(folder: str | Path) -> ImportedCatalogue:
    """Return the partner catalogue imported into `folder` (dest_dir/<namespace>), as its newest import left it."""
    folder = Path(folder)
    if not (folder / MARKER_FILE).is_file():
        raise ReidError(
            f"{folder}: not an imported partner catalogue ({MARKER_FILE} missing); import one with "
            "`python share.py mode=import archive=...`"
        )
    gallery = Gallery.load(folder)
    version_dir = folder / (folder / CURRENT_FILE).read_text().strip()
    record = folder / IMPORTS_DIR / version_dir.name
    try:
        manifest = json.loads((record / MANIFEST_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as err:
        raise ReidError(f"{record / MANIFEST_FILE}: unreadable ({err}); import the partner's archive again") from err
    crops_path = record / CROPS_INDEX_FILE
    crops = load_catalogue(crops_path) if crops_path.is_file() else None
    return ImportedCatalogue(gallery, manifest, folder, version_dir, crops)


def software_version() -> str:
    """Return the installed leopard-reid version (recorded in every archive's manifest)."""
    return reid.__version__


# --- export -------------------------------------------------------------------------------------


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array, dtype=np.float32), allow_pickle=False)
    return buffer.getvalue()


def _add_member(tar: tarfile.TarFile, name: str, data: bytes, created: str) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = int(datetime.fromisoformat(created).timestamp())
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def _add_crops(
    entries: pd.DataFrame, add: Callable[[str, bytes], None], max_side_px: int, progress: bool
) -> tuple[list[dict[str, str]], list[Problem]]:
    index: list[dict[str, str]] = []
    problems: list[Problem] = []
    rows = entries.to_dict("records")
    for i, row in enumerate(tqdm(rows, desc="crops", unit="img", disable=not progress)):
        box = [float(row[c]) for c in BBOX_COLUMNS]
        try:
            pixels = read_image(str(row["image_path"]), None if any(np.isnan(box)) else box, max_side_px=max_side_px)
        except ImageReadError as err:
            problems.append(
                Problem(err.path, f"annotation {row['annotation_id']}", f"{err.reason}; its crop is not in the archive")
            )
            continue
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=CROP_JPEG_QUALITY)
        # Named by row number: annotation IDs may hold any character, file names in the archive may not.
        name = f"{CROPS_DIR}/{i:06d}.jpg"
        add(name, buffer.getvalue())
        index.append({"annotation_id": str(row["annotation_id"]), "file": name})
    return index, problems


# --- import: members ----------------------------------------------------------------------------


def _extract_checked(archive: Path, tmp: Path, progress: bool) -> dict[str, Path]:
    """Return {member name: file in tmp} after checking every header first, then copying the content."""
    if not archive.is_file():
        raise ArchiveError(archive, "", "file not found", "check the path of the archive you received")
    try:
        with tarfile.open(archive, mode="r:gz") as tar:
            members = _checked_members(archive, tar)
            return {
                member.name: _copy_member(archive, tar, member, tmp)
                for member in tqdm(members, desc="checking archive", unit="file", disable=not progress)
            }
    except (tarfile.TarError, OSError, EOFError, zlib.error) as err:
        raise ArchiveError(
            archive, "", f"not a readable .tar.gz archive, or truncated or corrupt ({err})", ASK_RESEND
        ) from err


def _checked_members(archive: Path, tar: tarfile.TarFile) -> list[tarfile.TarInfo]:
    """Return the regular-file members after checking every member's header."""
    files: list[tarfile.TarInfo] = []
    seen: set[str] = set()
    total_bytes = 0
    compressed_bytes = archive.stat().st_size
    unpacked_limit = min(MAX_TOTAL_BYTES, max(MIN_UNPACKED_ALLOWANCE, MAX_EXPANSION * compressed_bytes))
    # Lazily, so a flood of headers stops at MAX_MEMBERS instead of filling memory.
    for count, member in enumerate(tar, start=1):
        if count > MAX_MEMBERS:
            raise ArchiveError(archive, member.name, f"the archive has more than {MAX_MEMBERS} members", ASK_NEW_EXPORT)
        problem = _member_problem(member)
        if problem:
            raise ArchiveError(archive, member.name, problem, ASK_NEW_EXPORT)
        if member.name in seen:
            raise ArchiveError(archive, member.name, "appears twice in the archive", ASK_NEW_EXPORT)
        seen.add(member.name)
        total_bytes += member.size
        if total_bytes > unpacked_limit:
            raise ArchiveError(
                archive,
                member.name,
                f"the archive would unpack to more than {unpacked_limit} bytes from {compressed_bytes} "
                f"(the limit is {MAX_EXPANSION} times its size, at least {MIN_UNPACKED_ALLOWANCE} bytes, at most "
                f"{MAX_TOTAL_BYTES}): a compression bomb, or not a catalogue archive",
                ASK_NEW_EXPORT,
            )
        if member.isreg():
            files.append(member)
    return files


def _member_problem(member: tarfile.TarInfo) -> str | None:
    """Return why a tar member may not be imported, judged from its header alone, or None."""
    name = member.name
    if name.startswith(("/", "\\")) or re.match(r"[A-Za-z]:", name):
        return "has an absolute path, which would write outside the destination"
    if ".." in PurePosixPath(name.replace("\\", "/")).parts:
        return "has a path with '..', which would write outside the destination"
    if member.issym():
        return f"is a symbolic link (to {member.linkname!r}); an archive holds only regular files"
    if member.islnk():
        return f"is a hard link (to {member.linkname!r}); an archive holds only regular files"
    if member.ischr() or member.isblk():
        return "is a device file; an archive holds only regular files"
    if member.isfifo():
        return "is a FIFO; an archive holds only regular files"
    if member.isdir():
        return None if name in _DIRECTORIES else "is an unexpected folder"
    if member.type not in (tarfile.REGTYPE, tarfile.AREGTYPE):
        return f"is not a regular file (tar type {member.type!r})"
    problem = _name_problem(name)
    if problem:
        return problem
    limit = MAX_MANIFEST_BYTES if name == MANIFEST_FILE else MAX_MEMBER_BYTES
    if member.size > limit:
        return f"is {member.size} bytes, over the limit of {limit}"
    return None


def _name_problem(name: str) -> str | None:
    """Return why a file name is not one an archive may hold, or None."""
    if PurePosixPath(name).suffix.lower() in PICKLE_SUFFIXES:
        return "is a pickle, which runs code when loaded; archives never hold pickles"
    if name in _FIXED_NAMES or _CROP_NAME.fullmatch(name):
        return None
    head, _, rest = name.partition("/")
    if head == EXTRA_DIR and _EXTRA_NAME.fullmatch(rest) and PurePosixPath(rest).suffix in EXTRA_SUFFIXES:
        return None
    return (
        f"is not a file a catalogue archive holds ({', '.join(_FIXED_NAMES)}, {CROPS_DIR}/<n>.jpg, "
        f"{EXTRA_DIR}/<name> ending in {', '.join(EXTRA_SUFFIXES)})"
    )


def _copy_member(archive: Path, tar: tarfile.TarFile, member: tarfile.TarInfo, tmp: Path) -> Path:
    source = tar.extractfile(member)
    if source is None:
        raise ArchiveError(archive, member.name, "has no content", ASK_RESEND)
    # The name passed the allowlist, so it stays inside tmp.
    target = tmp / "files" / member.name
    target.parent.mkdir(parents=True, exist_ok=True)
    copied = 0
    with source, open(target, "xb") as out:
        while chunk := source.read(1 << 20):
            copied += len(chunk)
            if copied > member.size:
                raise ArchiveError(archive, member.name, "is longer than its header says", ASK_NEW_EXPORT)
            try:
                out.write(chunk)
            except OSError as err:
                raise ArchiveError(
                    archive,
                    member.name,
                    f"could not be unpacked into the temporary folder {tmp} ({err})",
                    "free disk space there (or point TMPDIR at a larger disk) and import again",
                ) from err
    if copied != member.size:
        raise ArchiveError(archive, member.name, f"is cut short ({copied} of {member.size} bytes)", ASK_RESEND)
    return target


def _content_problem(name: str, data: bytes) -> str | None:
    """Return why a file's content may not be used, or None; never unpickles anything."""
    if data[:1] == b"\x80" and data[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "is a pickle (by its first bytes), which runs code when loaded; archives never hold pickles"
    if _is_text_pickle(data):
        return "is a pickle (protocol 0 or 1, by its opcodes), which runs code when loaded; archives never hold pickles"
    suffix = PurePosixPath(name).suffix
    try:
        if suffix == ".npy":
            # allow_pickle=False: an object array, the one kind that needs pickle, raises ValueError.
            if not isinstance(np.load(io.BytesIO(data), allow_pickle=False), np.ndarray):
                return "is not a single NumPy array"
        elif suffix == ".npz":
            with zipfile.ZipFile(io.BytesIO(data)) as packed:
                unpacked_bytes = sum(info.file_size for info in packed.infolist())
            if unpacked_bytes > MAX_MEMBER_BYTES:
                return f"unpacks to {unpacked_bytes} bytes, over the limit of {MAX_MEMBER_BYTES}"
            with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
                for key in arrays.files:
                    if not isinstance(arrays[key], np.ndarray):
                        return f"holds {key!r}, which is not a NumPy array"
        elif suffix == ".json":
            json.loads(data.decode("utf-8"))
        elif suffix in (".csv", ".txt"):
            data.decode("utf-8")
        elif suffix == ".jpg" and not data.startswith(b"\xff\xd8\xff"):
            return "is not a JPEG image"
    except (ValueError, EOFError, OSError, KeyError, RecursionError, zipfile.BadZipFile) as err:
        return f"cannot be read safely as {suffix} ({err})"
    return None


def _is_text_pickle(data: bytes) -> bool:
    """Return True when the bytes are a protocol 0 or 1 pickle, judged by reading its opcodes without running them.

    Such a pickle is plain ASCII, so it passes as .txt or .csv. No text file is a
    valid opcode stream that ends in STOP with a consistent stack (JSON never is).
    """
    if data[:1] == b"\x80":
        return False  # protocols 2-5, judged by their first bytes
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # odd escapes in text read as string arguments
            pickletools.dis(io.BytesIO(data), out=io.StringIO())
    except Exception:
        return False
    return True


# --- import: manifest, gallery, crops -----------------------------------------------------------


def _verified_manifest(archive: Path, staged: dict[str, Path]) -> dict[str, Any]:
    """Return the manifest after checking its versions and owner, and every file against its checksum."""
    if MANIFEST_FILE not in staged:
        raise ArchiveError(archive, MANIFEST_FILE, "is missing", ASK_RESEND)
    try:
        manifest = json.loads(staged[MANIFEST_FILE].read_bytes().decode("utf-8"))
    except (ValueError, RecursionError) as err:
        raise ArchiveError(archive, MANIFEST_FILE, f"is not valid JSON ({err})", ASK_RESEND) from err
    if not isinstance(manifest, dict) or manifest.get("format") != ARCHIVE_FORMAT:
        raise ArchiveError(archive, MANIFEST_FILE, f"does not describe a {ARCHIVE_FORMAT}", ASK_NEW_EXPORT)
    made_by = f"written by leopard-reid {manifest.get('software_version', '?')}, read by {software_version()}"
    for key, known in (
        ("archive_schema_version", ARCHIVE_SCHEMA_VERSION),
        ("gallery_schema_version", GALLERY_SCHEMA_VERSION),
    ):
        if manifest.get(key) != known:
            raise ArchiveError(
                archive,
                MANIFEST_FILE,
                f"{key} is {manifest.get(key)!r}, this software reads {known} ({made_by})",
                f"ask the sender to export with leopard-reid {software_version()} (yours), or install the version they used",
            )
    _check_owner(manifest.get("organisation"), manifest.get("namespace"), archive, ASK_NEW_EXPORT)
    try:
        zoned = datetime.fromisoformat(str(manifest.get("created"))).tzinfo is not None
    except ValueError:
        zoned = False
    if not zoned:
        raise ArchiveError(
            archive,
            MANIFEST_FILE,
            f"created {manifest.get('created')!r} is not an ISO 8601 time with offset",
            ASK_RESEND,
        )
    files = manifest.get("files")
    if not isinstance(files, dict) or not all(
        isinstance(name, str) and isinstance(digest, str) and _SHA256.fullmatch(digest)
        for name, digest in files.items()
    ):
        raise ArchiveError(archive, MANIFEST_FILE, "has no valid list of files with SHA-256 checksums", ASK_RESEND)
    for name in staged:
        if name != MANIFEST_FILE and name not in files:
            raise ArchiveError(archive, name, "is not listed in the manifest", ASK_NEW_EXPORT)
    for name in files:
        problem = "is the manifest itself" if name == MANIFEST_FILE else _name_problem(name)
        if problem:
            raise ArchiveError(archive, name, f"listed in the manifest {problem}", ASK_NEW_EXPORT)
        if name not in staged:
            raise ArchiveError(archive, name, "is listed in the manifest but missing from the archive", ASK_RESEND)
    for name in (ENTRIES_FILE, EMBEDDINGS_FILE):
        if name not in files:
            raise ArchiveError(archive, name, "is missing", ASK_RESEND)
    for name, expected in files.items():
        if sha256_file(staged[name]) != expected:
            raise ArchiveError(archive, name, "checksum mismatch: altered or damaged after export", ASK_RESEND)
    for name in files:
        problem = _content_problem(name, staged[name].read_bytes())
        if problem:
            raise ArchiveError(archive, name, problem, ASK_NEW_EXPORT)
        if name.startswith(CROPS_DIR + "/"):
            try:
                image_size(staged[name])
            except ImageReadError as err:
                raise ArchiveError(archive, name, err.reason, ASK_NEW_EXPORT) from err
    return manifest


def _gallery_from(archive: Path, staged: dict[str, Path], manifest: dict[str, Any]) -> Gallery:
    try:
        raw = pd.read_csv(staged[ENTRIES_FILE], dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise ArchiveError(archive, ENTRIES_FILE, f"is not a readable CSV ({err})", ASK_NEW_EXPORT) from err
    expected = [*COLUMN_NAMES, "content_hash"]
    if list(raw.columns) != expected:
        raise ArchiveError(
            archive, ENTRIES_FILE, f"has columns {list(raw.columns)}, expected {expected}", ASK_NEW_EXPORT
        )
    entries, problems = entries_from_table(raw)
    if problems:
        raise ArchiveError(
            archive,
            ENTRIES_FILE,
            f"has {len(problems)} invalid rows; {problems[0].where}: {problems[0].message}",
            ASK_NEW_EXPORT,
        )
    embeddings = np.load(staged[EMBEDDINGS_FILE], allow_pickle=False)
    dim = manifest.get("embedding_dim")
    if embeddings.dtype != np.float32 or embeddings.shape != (len(entries), dim):
        raise ArchiveError(
            archive,
            EMBEDDINGS_FILE,
            f"is {embeddings.dtype} {embeddings.shape}, expected float32 ({len(entries)}, {dim}) for the entries",
            ASK_NEW_EXPORT,
        )
    if not np.isfinite(embeddings).all():
        raise ArchiveError(archive, EMBEDDINGS_FILE, "holds NaN or infinite values", ASK_NEW_EXPORT)
    counted = manifest.get("counts", {}).get("entries") if isinstance(manifest.get("counts"), dict) else None
    if counted != len(entries):
        raise ArchiveError(
            archive, ENTRIES_FILE, f"has {len(entries)} rows, the manifest counts {counted!r}", ASK_NEW_EXPORT
        )
    fingerprint = manifest.get("embedder_fingerprint")
    if not isinstance(fingerprint, str) or not fingerprint:
        raise ArchiveError(archive, MANIFEST_FILE, "names no embedder_fingerprint", ASK_NEW_EXPORT)
    index_kind = manifest.get("index_kind", "flat")
    prefix = EXTRA_DIR + "/"
    return Gallery(
        entries=entries,
        embeddings=embeddings,
        embedder_fingerprint=fingerprint,
        index_kind=cast(IndexKind, index_kind if index_kind in get_args(IndexKind) else "flat"),
        created=str(manifest.get("gallery_created") or manifest["created"]),
        extra_files={
            name[len(prefix) :]: path.read_bytes() for name, path in sorted(staged.items()) if name.startswith(prefix)
        },
    )


def _crops_index(archive: Path, staged: dict[str, Path], entries: pd.DataFrame) -> pd.DataFrame | None:
    """Return the checked crops index (annotation_id, file), or None when the archive ships no crops."""
    crop_files = {name for name in staged if name.startswith(CROPS_DIR + "/")}
    if CROPS_INDEX_FILE not in staged:
        if crop_files:
            raise ArchiveError(archive, min(crop_files), f"is a crop but {CROPS_INDEX_FILE} is missing", ASK_RESEND)
        return None
    try:
        index = pd.read_csv(staged[CROPS_INDEX_FILE], dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise ArchiveError(archive, CROPS_INDEX_FILE, f"is not a readable CSV ({err})", ASK_NEW_EXPORT) from err
    if list(index.columns) != _CROPS_INDEX_COLUMNS:
        raise ArchiveError(
            archive,
            CROPS_INDEX_FILE,
            f"has columns {list(index.columns)}, expected {_CROPS_INDEX_COLUMNS}",
            ASK_NEW_EXPORT,
        )
    known = set(entries["annotation_id"])
    for line, (annotation_id, file) in enumerate(index.itertuples(index=False), start=2):
        if annotation_id not in known or file not in crop_files:
            raise ArchiveError(
                archive,
                CROPS_INDEX_FILE,
                f"row {line}: annotation {annotation_id!r} or crop {file!r} is not in the archive",
                ASK_NEW_EXPORT,
            )
    if (
        index["annotation_id"].duplicated().any()
        or set(index["file"]) != crop_files
        or index["file"].duplicated().any()
    ):
        raise ArchiveError(
            archive, CROPS_INDEX_FILE, "does not list every crop exactly once for one annotation each", ASK_NEW_EXPORT
        )
    return index


# --- import: destination ------------------------------------------------------------------------


def _target_folder(archive: Path, dest_dir: Path, manifest: dict[str, Any]) -> tuple[Path, dict[str, Any] | None]:
    """Return (dest_dir/<namespace>, its IMPORTED.json or None when new) after checking it may be written."""
    organisation, namespace = manifest["organisation"], manifest["namespace"]
    owner = f"{organisation} ({namespace})"

    def refuse(where: Path, problem: str, fix: str) -> ArchiveError:
        return ArchiveError(archive, "", f"cannot import into {where}: {problem}", fix)

    if (dest_dir / MARKER_FILE).exists():
        raise refuse(
            dest_dir,
            "it is itself an imported partner catalogue",
            "import into the folder that holds partner catalogues (its parent); each gets its own sub-folder",
        )
    if (dest_dir / CURRENT_FILE).exists():
        raise refuse(
            dest_dir,
            "it is a gallery folder (a local catalogue?), which an import never writes into",
            "import into a separate folder for partner catalogues",
        )
    if dest_dir.exists() and not dest_dir.is_dir():
        raise refuse(dest_dir, "it is a file, not a folder", "give a folder for partner catalogues")
    folder = dest_dir / namespace
    if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
        raise refuse(folder, "it is a link or a file", f"move it away before importing {owner}")
    if not folder.exists():
        return folder, None
    marker_path = folder / MARKER_FILE
    if not marker_path.is_file():
        if any(p.name != LOCK_FILE for p in folder.iterdir()):
            raise refuse(
                folder,
                "it holds files that were not imported from a catalogue archive (a local catalogue?), "
                "which are never overwritten",
                f"import into another folder, or move that folder away before importing {owner}",
            )
        return folder, None
    try:
        marker = json.loads(marker_path.read_text(encoding="utf-8"))
        held = f"{marker['organisation']} ({marker['namespace']})"
        last_created = marker["imports"][-1]["archive_created"] if marker["imports"] else None
    except (OSError, ValueError, KeyError, TypeError, IndexError, RecursionError) as err:
        raise refuse(folder, f"its {MARKER_FILE} is unreadable ({err})", "restore that folder from a backup") from err
    if (marker["organisation"], marker["namespace"]) != (organisation, namespace):
        raise refuse(
            folder,
            f"it holds the catalogue of {held}, this archive is from {owner}",
            "import into another folder; one folder holds one partner's catalogue",
        )
    if last_created and datetime.fromisoformat(manifest["created"]) < datetime.fromisoformat(last_created):
        raise refuse(
            folder,
            f"this archive (created {manifest['created']}) is older than the one already imported ({last_created})",
            f"ask {organisation} for their latest export",
        )
    return folder, marker


def _install(
    archive: Path,
    folder: Path,
    marker: dict[str, Any] | None,
    manifest: dict[str, Any],
    staged: dict[str, Path],
    gallery: Gallery,
    crops_index: pd.DataFrame | None,
) -> ImportedCatalogue:
    folder.mkdir(parents=True, exist_ok=True)
    if marker is None:
        marker = {
            "format": ARCHIVE_FORMAT,
            "organisation": manifest["organisation"],
            "namespace": manifest["namespace"],
            "imports": [],
        }
        _write_json(folder / MARKER_FILE, marker)
    imports = folder / IMPORTS_DIR
    imports.mkdir(exist_ok=True)
    for stale in imports.glob(".staging-*"):
        shutil.rmtree(stale, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=imports))
    crops = None
    try:
        shutil.copyfile(staged[MANIFEST_FILE], staging / MANIFEST_FILE)
        if crops_index is not None:
            (staging / CROPS_DIR).mkdir()
            for file in crops_index["file"]:
                shutil.copyfile(staged[file], staging / file)
            save_catalogue(_crops_table(gallery.entries, crops_index, staging), staging / CROPS_INDEX_FILE)
        # The partner's newer export replaces what was imported before (the lock is held).
        version_dir = gallery.save(folder, replace=True)
        record = imports / version_dir.name
        if record.exists():
            shutil.rmtree(record)
        staging.replace(record)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if crops_index is not None:
        crops = _crops_table(gallery.entries, crops_index, record)
    marker["imports"].append(
        {
            "version": version_dir.name,
            "archive": archive.name,
            "archive_sha256": sha256_file(archive),
            "archive_created": manifest["created"],
            "imported": _now(),
            "entries": len(gallery),
        }
    )
    _write_json(folder / MARKER_FILE, marker)
    return ImportedCatalogue(gallery, manifest, folder, version_dir, crops)


def _crops_table(entries: pd.DataFrame, crops_index: pd.DataFrame, folder: Path) -> pd.DataFrame:
    """Return the entries that have a crop, as catalogue rows pointing at the crop with no box."""
    file_of = dict(zip(crops_index["annotation_id"], crops_index["file"], strict=True))
    table = entries.loc[entries["annotation_id"].isin(list(file_of)), list(COLUMN_NAMES)].reset_index(drop=True)
    table["image_path"] = pd.array([str(folder / file_of[a]) for a in table["annotation_id"]], dtype="string")
    for column in BBOX_COLUMNS:
        table[column] = np.nan
    return table


# --- shared -------------------------------------------------------------------------------------


def _check_owner(organisation: Any, namespace: Any, where: Path, ask: str) -> None:
    if not isinstance(organisation, str) or not organisation.strip() or len(organisation) > 200:
        raise ArchiveError(where, "", f"organisation {organisation!r} must be a name of 1 to 200 characters", ask)
    # The namespace becomes a folder name on import: letters, digits, '-' and '_' only.
    if not isinstance(namespace, str) or not _NAMESPACE.fullmatch(namespace):
        raise ArchiveError(
            where, "", f"namespace {namespace!r} must be 1 to 32 letters, digits, '-' or '_' (such as KZ, TM)", ask
        )


def _write_json(path: Path, data: dict[str, Any]) -> None:
    with atomic_write(path) as f:
        f.write(json.dumps(data, indent=2) + "\n")


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
