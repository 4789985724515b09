"""Catalogue archives: exact round trips, generalised coordinates, crops, and refusal of unsafe archives."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import pickle
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from reid import sharing
from reid.catalogue import COLUMN_NAMES, build_catalogue, generalise_coordinates
from reid.errors import ReidError
from reid.gallery import Gallery
from reid.images import read_image
from reid.sharing import ArchiveError, export_catalogue, import_catalogue

DIM = 16
Members = dict[str, bytes]


@pytest.fixture
def gallery(flank_catalogue: pd.DataFrame) -> Gallery:
    """Return a gallery of the flank catalogue's rows with random embeddings, coordinates and extra files."""
    rng = np.random.default_rng(0)
    rows = flank_catalogue.copy()
    rows["latitude"] = rng.uniform(41.0, 44.0, len(rows))
    rows["longitude"] = rng.uniform(52.0, 56.0, len(rows))
    rows.loc[3, ["latitude", "longitude"]] = np.nan
    rows["country"] = "KZ"
    rows["sex"] = ["female", "male", "unknown"] * (len(rows) // 3)
    rows, problems = build_catalogue(rows)
    assert problems == []
    emb = rng.normal(size=(len(rows), DIM)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    built = Gallery.empty("fp-kz-test", DIM)
    assert built.add(rows, emb, [f"hash{i}" for i in range(len(rows))]) == []
    keypoints = io.BytesIO()
    np.savez_compressed(keypoints, row=np.arange(len(rows)), xy=rng.normal(size=(len(rows), 5, 2)))
    built.extra_files = {"thresholds.json": b'{"known": 0.7, "new": 0.4}', "keypoints.npz": keypoints.getvalue()}
    return built


@pytest.fixture
def gallery_dir(gallery: Gallery, tmp_path: Path) -> Path:
    gallery.save(tmp_path / "kz-gallery")
    return tmp_path / "kz-gallery"


@pytest.fixture
def archive(gallery_dir: Path, tmp_path: Path) -> Path:
    return export_catalogue(gallery_dir, tmp_path / "kz.tar.gz", organisation="KZ team", namespace="KZ", progress=False)


def _members(path: Path) -> Members:
    with tarfile.open(path, "r:gz") as tar:
        return {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}  # type: ignore[union-attr]


def _pack(path: Path, members: Members, *specials: tuple[tarfile.TarInfo, bytes]) -> Path:
    """Write members (and hand-made headers) as a .tar.gz, as a forger with tarfile would."""
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for info, data in specials:
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _relisted(members: Members) -> Members:
    """Return members with the manifest's checksums recomputed, so only the check under test can fire."""
    manifest = json.loads(members["manifest.json"])
    manifest["files"] = {n: hashlib.sha256(d).hexdigest() for n, d in members.items() if n != "manifest.json"}
    return {**members, "manifest.json": json.dumps(manifest).encode()}


def _snapshot(root: Path) -> dict[str, bytes | None]:
    if not root.exists():
        return {}
    return {p.relative_to(root).as_posix(): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


@pytest.fixture
def dest(tmp_path: Path, gallery: Gallery) -> Path:
    """Return a partners folder that already holds a local gallery and a note, which no import may touch."""
    root = tmp_path / "partners"
    gallery.save(root / "local-kz")
    (root / "notes.txt").write_text("keep me")
    return root


def test_round_trip_is_bit_exact_except_generalised_coordinates(
    gallery: Gallery, archive: Path, dest: Path, gallery_dir: Path
) -> None:
    imported = import_catalogue(archive, dest, progress=False)
    manifest = imported.manifest
    assert manifest["coordinates"] == {"generalised": True, "precision_deg": 0.1, "uncertainty_m": 7872}
    assert (manifest["organisation"], manifest["namespace"]) == ("KZ team", "KZ")
    assert manifest["embedder_fingerprint"] == "fp-kz-test" and manifest["embedding_dim"] == DIM
    assert manifest["counts"]["entries"] == len(gallery) and manifest["software_version"]
    rounded, _ = generalise_coordinates(gallery.entries, manifest["coordinates"]["precision_deg"])
    for loaded in (imported.gallery, Gallery.load(dest / "KZ", embedder_fingerprint="fp-kz-test")):
        pd.testing.assert_frame_equal(loaded.entries, rounded, check_exact=True)
        np.testing.assert_array_equal(loaded.embeddings, gallery.embeddings, strict=True)
        assert loaded.extra_files == gallery.extra_files
    others = [c for c in gallery.entries.columns if c not in ("latitude", "longitude")]
    pd.testing.assert_frame_equal(imported.gallery.entries[others], gallery.entries[others], check_exact=True)
    # Independently of generalise_coordinates: every coordinate moved by at most half a step, onto the 0.1 grid.
    for column in ("latitude", "longitude"):
        original, shared = gallery.entries[column].to_numpy(), imported.gallery.entries[column].to_numpy()
        assert np.array_equal(np.isnan(original), np.isnan(shared))
        known = ~np.isnan(original)
        assert (np.abs(shared[known] - original[known]) <= 0.05 + 1e-9).all()
        assert np.allclose(shared[known] * 10, np.round(shared[known] * 10), atol=1e-9)
        assert (shared[known] != original[known]).any()
    assert imported.crops is None and imported.folder == dest / "KZ"


def test_exact_coordinates_only_when_asked(gallery: Gallery, gallery_dir: Path, tmp_path: Path) -> None:
    path = export_catalogue(
        gallery_dir, tmp_path / "exact.tar.gz", organisation="KZ team", namespace="KZ", exact_coordinates=True
    )
    imported = import_catalogue(path, tmp_path / "in", progress=False)
    assert imported.manifest["coordinates"]["precision_deg"] == "exact"
    assert imported.manifest["coordinates"]["uncertainty_m"] == "exact"
    pd.testing.assert_frame_equal(imported.gallery.entries, gallery.entries, check_exact=True)


def test_manifest_lists_the_checksum_of_every_other_member(archive: Path) -> None:
    members = _members(archive)
    manifest = json.loads(members.pop("manifest.json"))
    assert manifest["files"] == {name: hashlib.sha256(data).hexdigest() for name, data in members.items()}
    assert set(members) == {"entries.csv", "embeddings.npy", "extra/keypoints.npz", "extra/thresholds.json"}


def test_crops_are_shipped_only_when_asked_and_are_readable(
    gallery: Gallery, gallery_dir: Path, archive: Path, tmp_path: Path
) -> None:
    assert not any(name.startswith("crops") for name in _members(archive))
    path = export_catalogue(
        gallery_dir,
        tmp_path / "crops.tar.gz",
        organisation="KZ team",
        namespace="KZ",
        crops=True,
        crop_max_side_px=40,
        progress=False,
    )
    imported = import_catalogue(path, tmp_path / "in", progress=False)
    crops = imported.crops
    assert crops is not None and list(crops.columns) == list(COLUMN_NAMES)
    assert crops["annotation_id"].tolist() == gallery.entries["annotation_id"].tolist()
    assert crops[["bbox_x", "bbox_y", "bbox_w", "bbox_h"]].isna().all().all()
    for path_text in crops["image_path"]:
        assert Path(path_text).is_relative_to(tmp_path / "in" / "KZ")
        pixels = read_image(path_text)
        assert pixels.ndim == 3 and max(pixels.shape[:2]) == 40  # a 96 x 48 box shrunk to 40 x 20
    same = [c for c in COLUMN_NAMES if c not in ("image_path", "bbox_x", "bbox_y", "bbox_w", "bbox_h")]
    pd.testing.assert_frame_equal(crops[same], imported.gallery.entries[same], check_exact=True)


def test_a_newer_archive_adds_a_gallery_version_and_leaves_the_rest_alone(
    gallery: Gallery, gallery_dir: Path, archive: Path, dest: Path, tmp_path: Path
) -> None:
    before = _snapshot(dest)
    first = import_catalogue(archive, dest, progress=False)
    assert {k: v for k, v in _snapshot(dest).items() if not k.startswith("KZ")} == before
    grown = Gallery.load(gallery_dir)
    extra = gallery.entries.iloc[:2].assign(annotation_id=["new-1", "new-2"])
    grown.add(extra, gallery.embeddings[:2], ["new-hash-1", "new-hash-2"])
    grown.save(gallery_dir)
    newer = export_catalogue(gallery_dir, tmp_path / "kz2.tar.gz", organisation="KZ team", namespace="KZ")
    second = import_catalogue(newer, dest, progress=False)
    assert (first.version_dir.name, second.version_dir.name) == ("v000001", "v000002")
    assert len(Gallery.load(dest / "KZ")) == len(gallery) + 2
    marker = json.loads((dest / "KZ" / "IMPORTED.json").read_text())
    assert [i["version"] for i in marker["imports"]] == ["v000001", "v000002"]
    assert {k: v for k, v in _snapshot(dest).items() if not k.startswith("KZ")} == before

    older = _members(archive)
    manifest = json.loads(older["manifest.json"])
    manifest["created"] = "2001-01-01T00:00:00+00:00"
    stale = _pack(tmp_path / "stale.tar.gz", {**older, "manifest.json": json.dumps(manifest).encode()})
    with pytest.raises(ArchiveError, match="older than the one already imported"):
        import_catalogue(stale, dest, progress=False)


def _symlink() -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo("extra/link.json")
    info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
    return info, b""


def _hardlink() -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo("extra/link.json")
    info.type, info.linkname = tarfile.LNKTYPE, "/etc/passwd"
    return info, b""


def _device() -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo("extra/device.json")
    info.type, info.devmajor, info.devminor = tarfile.CHRTYPE, 1, 3
    return info, b""


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=True)
    return buffer.getvalue()


def _with_schema(version: int) -> Callable[[Members], Members]:
    def edit(members: Members) -> Members:
        manifest = json.loads(members["manifest.json"])
        manifest["archive_schema_version"] = version
        return {**members, "manifest.json": json.dumps(manifest).encode()}

    return edit


def _tampered(members: Members) -> Members:
    data = bytearray(members["entries.csv"])
    data[data.index(b"KZ-0001")] = ord("X")
    return {**members, "entries.csv": bytes(data)}


MALICIOUS: dict[str, tuple[Callable[[Members], Members], list[Callable[[], tuple[tarfile.TarInfo, bytes]]], str]] = {
    "path traversal": (lambda m: {**m, "../evil": b"x"}, [], r"'\.\./evil'.*'\.\.'"),
    "nested traversal": (lambda m: {**m, "crops/../../evil.jpg": b"x"}, [], r"'\.\.'"),
    "absolute path": (lambda m: {**m, "/tmp/evil": b"x"}, [], "absolute path"),
    "symlink": (lambda m: m, [_symlink], "symbolic link"),
    "hard link": (lambda m: m, [_hardlink], "hard link"),
    "device file": (lambda m: m, [_device], "device file"),
    "tampered checksum": (_tampered, [], r"'entries\.csv'.*checksum mismatch"),
    "pickle member": (lambda m: _relisted({**m, "extra/model.pkl": pickle.dumps({"a": 1})}), [], "pickle"),
    "pickle bytes in an allowed name": (
        lambda m: _relisted({**m, "extra/thresholds.json": pickle.dumps({"a": 1})}),
        [],
        "pickle",
    ),
    "protocol-0 pickle under a text name": (
        lambda m: _relisted({**m, "extra/notes.txt": pickle.dumps({"a": [1, 2]}, protocol=0)}),
        [],
        "pickle",
    ),
    "deeply nested manifest": (lambda m: {**m, "manifest.json": b"[" * 100_000 + b"]" * 100_000}, [], "not valid JSON"),
    "object array": (
        lambda m: _relisted({**m, "embeddings.npy": _npy(np.array([{"evil": 1}], dtype=object))}),
        [],
        "pickle",
    ),
    "unknown schema version": (_with_schema(99), [], "archive_schema_version is 99"),
    "unlisted extra file": (lambda m: {**m, "extra/notes.txt": b"hello"}, [], "not listed in the manifest"),
    "unexpected name": (lambda m: _relisted({**m, "run.sh": b"rm -rf /"}), [], "not a file a catalogue archive"),
    "missing file": (lambda m: {k: v for k, v in m.items() if k != "embeddings.npy"}, [], "missing"),
    "bad namespace": (
        lambda m: {**m, "manifest.json": m["manifest.json"].replace(b'"KZ"', b'"../KZ"')},
        [],
        "namespace",
    ),
}


@pytest.mark.parametrize("case", list(MALICIOUS))
def test_unsafe_archives_are_refused_and_nothing_is_written(
    case: str, archive: Path, dest: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    edit, specials, message = MALICIOUS[case]
    bad = _pack(tmp_path / "bad.tar.gz", edit(_members(archive)), *(make() for make in specials))
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    before = _snapshot(dest)
    with pytest.raises(ArchiveError, match=message) as refused:
        import_catalogue(bad, dest, progress=False)
    assert isinstance(refused.value, ReidError)
    assert str(bad) in str(refused.value) and "ask the sender" in str(refused.value)
    assert _snapshot(dest) == before
    assert not (tmp_path / "evil").exists() and list(scratch.iterdir()) == []


def test_oversized_members_are_refused(archive: Path, dest: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("reid.sharing.MAX_MEMBER_BYTES", 100)
    before = _snapshot(dest)
    with pytest.raises(ArchiveError, match="over the limit of 100"):
        import_catalogue(archive, dest, progress=False)
    assert _snapshot(dest) == before


def test_a_compression_bomb_is_refused_before_anything_is_unpacked(
    archive: Path, dest: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("reid.sharing.MIN_UNPACKED_ALLOWANCE", 1 << 20)
    bomb = _pack(tmp_path / "bomb.tar.gz", {**_members(archive), "extra/zeros.txt": bytes(40 << 20)})
    assert bomb.stat().st_size < 200_000
    copied: list[str] = []
    real_copy = sharing._copy_member
    monkeypatch.setattr(sharing, "_copy_member", lambda *a: copied.append(a[2].name) or real_copy(*a))
    before = _snapshot(dest)
    with pytest.raises(ArchiveError, match=r"'extra/zeros.txt': the archive would unpack to more than \d+ bytes"):
        import_catalogue(bomb, dest, progress=False)
    assert copied == [] and _snapshot(dest) == before


def test_a_text_file_is_not_taken_for_a_pickle() -> None:
    for text in (b"0.5\n", b"annotation_id,file\nx,crops/000001.jpg\n", b'{"known": 0.7}', b"(a) notes\n"):
        assert sharing._content_problem("extra/notes.txt", text) is None


@pytest.mark.parametrize("damage", ["garbage", "truncated", "gzip of garbage", "missing"])
def test_corrupt_or_truncated_archives_give_a_clear_error(damage: str, archive: Path, dest: Path) -> None:
    data = archive.read_bytes()
    bad = archive.with_name("damaged.tar.gz")
    if damage == "garbage":
        bad.write_bytes(b"this is not an archive")
    elif damage == "truncated":
        bad.write_bytes(data[: len(data) // 2])
    elif damage == "gzip of garbage":
        bad.write_bytes(gzip.compress(b"\x01" * 5000))
    before = _snapshot(dest)
    with pytest.raises(ArchiveError, match="not found" if damage == "missing" else "truncated or corrupt"):
        import_catalogue(bad, dest, progress=False)
    assert _snapshot(dest) == before


def test_a_folder_holding_another_catalogue_is_refused(archive: Path, gallery_dir: Path, tmp_path: Path) -> None:
    partners = tmp_path / "partners"
    import_catalogue(archive, partners, progress=False)
    other = export_catalogue(gallery_dir, tmp_path / "other.tar.gz", organisation="Someone else", namespace="KZ")
    local = tmp_path / "local"
    Gallery.load(gallery_dir).save(local / "KZ")
    cases = [
        (other, partners, "holds the catalogue of KZ team \\(KZ\\)"),  # same namespace, other organisation
        (archive, partners / "KZ", "itself an imported partner catalogue"),  # into a namespace folder
        (archive, local, "not imported from a catalogue archive"),  # onto a local gallery named KZ
        (archive, gallery_dir, "is a gallery folder"),
    ]
    for path, target, message in cases:
        before = _snapshot(target)
        with pytest.raises(ArchiveError, match=message):
            import_catalogue(path, target, progress=False)
        assert _snapshot(target) == before


def test_export_refuses_bad_owner_and_leaves_no_file(gallery_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out" / "kz.tar.gz"
    with pytest.raises(ArchiveError, match="namespace"):
        export_catalogue(gallery_dir, out, organisation="KZ team", namespace="../KZ")
    with pytest.raises(ArchiveError, match="organisation"):
        export_catalogue(gallery_dir, out, organisation=" ", namespace="KZ")
    assert not out.parent.exists() or list(out.parent.iterdir()) == []


def test_export_refuses_an_unshareable_extra_file(gallery: Gallery, tmp_path: Path) -> None:
    gallery.extra_files["model.pkl"] = pickle.dumps({"a": 1})
    gallery.save(tmp_path / "g")
    with pytest.raises(ArchiveError, match=r"'model\.pkl' cannot be shared.*pickle"):
        export_catalogue(tmp_path / "g", tmp_path / "kz.tar.gz", organisation="KZ team", namespace="KZ")
    assert not (tmp_path / "kz.tar.gz").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".kz")] == []
