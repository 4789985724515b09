"""A gallery survives careless use: runs at once, a lost CURRENT, a damaged manifest; nothing lost, nothing silent."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from reid.catalogue import build_catalogue
from reid.gallery import CURRENT_FILE, LOCK_FILE, Gallery, GalleryError, current_version, gallery_lock


def _unit(n: int, seed: int, dim: int = 8) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _batch(start: int, n: int = 3) -> pd.DataFrame:
    rows = [
        {"annotation_id": f"a{i}", "image_path": f"/x/{i}.jpg", "individual_id": f"KZ-{i:04d}", "side": "left"}
        for i in range(start, start + n)
    ]
    return build_catalogue(rows)[0]


def _add(gallery: Gallery, start: int, n: int = 3) -> None:
    assert gallery.add(_batch(start, n), _unit(n, start), [f"h{i}" for i in range(start, start + n)]) == []


def _saved(folder: Path, n: int = 6) -> Gallery:
    gallery = Gallery.empty("fp", 8)
    _add(gallery, 0, n)
    gallery.save(folder)
    return gallery


# A run that extends the gallery: load, say so, wait for the other run to have loaded too, add a batch, save.
_EXTEND = textwrap.dedent(
    """
    import contextlib, sys, time
    from pathlib import Path
    sys.path.insert(0, sys.argv[4])
    from test_robustness_gallery import _add
    from reid.gallery import Gallery, GalleryError, gallery_lock

    folder, start, use_lock = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "lock"
    other = folder.parent / f"loaded-{1000 - start}"
    try:
        with gallery_lock(folder, wait_s=120) if use_lock else contextlib.nullcontext():
            gallery = Gallery.load(folder)
            (folder.parent / f"loaded-{start}").touch()
            deadline = time.monotonic() + (1 if use_lock else 60)
            while not other.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            _add(gallery, start)
            gallery.save(folder)
    except GalleryError as err:
        print(err, file=sys.stderr)
        sys.exit(1)
    """
)


def _two_runs_at_once(folder: Path, use_lock: bool) -> list[subprocess.CompletedProcess[str]]:
    runs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                _EXTEND,
                str(folder),
                str(start),
                "lock" if use_lock else "none",
                str(Path(__file__).parent),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for start in (100, 900)
    ]
    results = []
    for run in runs:
        out, err = run.communicate(timeout=300)
        results.append(subprocess.CompletedProcess(run.args, run.returncode, out, err))
    return results


def test_two_runs_extending_one_gallery_under_the_lock_both_land(tmp_path: Path) -> None:
    _saved(tmp_path / "g")
    results = _two_runs_at_once(tmp_path / "g", use_lock=True)
    assert [r.returncode for r in results] == [0, 0], [r.stderr for r in results]
    hashes = set(Gallery.load(tmp_path / "g").entries["content_hash"])
    assert {"h100", "h101", "h102", "h900", "h901", "h902"} <= hashes and len(hashes) == 12
    assert not (tmp_path / "g" / LOCK_FILE).exists()


def test_two_runs_extending_one_version_never_lose_a_batch_silently(tmp_path: Path) -> None:
    _saved(tmp_path / "g")
    results = _two_runs_at_once(tmp_path / "g", use_lock=False)
    assert sorted(r.returncode for r in results) == [0, 1]
    loser = next(r for r in results if r.returncode == 1)
    assert "was changed by another run while this one worked" in loser.stderr
    assert "nothing was saved: run again" in loser.stderr and len(loser.stderr.strip().splitlines()) == 1
    winner = 100 if results[0].returncode == 0 else 900
    hashes = set(Gallery.load(tmp_path / "g").entries["content_hash"])
    assert {f"h{winner + i}" for i in range(3)} <= hashes and len(hashes) == 9


def test_a_new_gallery_is_not_saved_over_one_another_run_created(tmp_path: Path) -> None:
    mine = Gallery.empty("fp", 8)
    _add(mine, 50)
    _saved(tmp_path / "g")  # another run got there first
    with pytest.raises(GalleryError, match=r"it was empty when this run loaded it, it is v000001 now"):
        mine.save(tmp_path / "g")
    assert len(Gallery.load(tmp_path / "g")) == 6


def test_a_lock_held_by_a_running_process_is_refused_naming_it(tmp_path: Path) -> None:
    folder = tmp_path / "g"
    folder.mkdir()
    since = datetime.now(UTC).isoformat(timespec="seconds")
    holder = {"pid": os.getpid(), "host": socket.gethostname(), "since": since, "token": "x"}
    (folder / LOCK_FILE).write_text(json.dumps(holder))
    with pytest.raises(GalleryError) as refused, gallery_lock(folder):
        pass
    message = str(refused.value)
    assert f"being changed by another run (pid {os.getpid()}, since {since})" in message
    assert f"delete {folder / LOCK_FILE} if no such run exists" in message
    assert (folder / LOCK_FILE).exists()  # never taken from a live run


def test_a_lock_left_by_a_dead_run_is_taken_over(tmp_path: Path) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    folder = tmp_path / "g"
    folder.mkdir()
    holder = {"pid": int(dead.stdout), "host": socket.gethostname(), "since": "2024-05-01T10:00:00+00:00", "token": "x"}
    (folder / LOCK_FILE).write_text(json.dumps(holder))
    with gallery_lock(folder) as lock:
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert not (folder / LOCK_FILE).exists()


def test_a_gallery_path_that_is_a_file_is_refused_before_any_work(tmp_path: Path) -> None:
    (tmp_path / "g").write_text("not a folder")
    with pytest.raises(GalleryError, match=r"g: is a file, not a gallery folder"), gallery_lock(tmp_path / "g"):
        pass


def test_loading_a_file_or_a_path_cut_at_a_space_says_so(tmp_path: Path) -> None:
    (tmp_path / "g").write_text("not a folder")
    with pytest.raises(GalleryError, match=r"g: is a file, not a gallery folder"):
        Gallery.load(tmp_path / "g")
    _saved(tmp_path / "KZ gallery")
    with pytest.raises(GalleryError, match=r"no gallery here .*looks cut at a space: .*KZ gallery exists"):
        Gallery.load(tmp_path / "KZ")


def test_a_folder_with_versions_but_no_current_is_refused_listing_them(tmp_path: Path) -> None:
    folder = tmp_path / "g"
    gallery = _saved(folder)
    _add(gallery, 10)
    gallery.save(folder)
    (folder / CURRENT_FILE).unlink()
    with pytest.raises(GalleryError) as refused:
        Gallery.load(folder)
    message = str(refused.value)
    assert "CURRENT is missing" in message and "v000001 (6 entries" in message and "v000002 (9 entries" in message
    assert f"writing its name into {folder / CURRENT_FILE}" in message and "\n" not in message
    for fresh in (Gallery.empty("fp", 8), gallery):
        with pytest.raises(GalleryError, match="CURRENT is missing"):
            fresh.save(folder)
    assert sorted(p.name for p in folder.iterdir()) == ["v000001", "v000002"]
    (folder / CURRENT_FILE).write_text("v000002\n")
    assert len(Gallery.load(folder)) == 9


def test_current_naming_a_missing_version_lists_the_versions_there(tmp_path: Path) -> None:
    _saved(tmp_path / "g")
    (tmp_path / "g" / CURRENT_FILE).write_text("v000007\n")
    with pytest.raises(
        GalleryError, match=r"names version 'v000007', which is not in the folder; .*v000001 \(6 entries"
    ):
        Gallery.load(tmp_path / "g")


def test_pruning_never_deletes_the_only_copy_of_entries(tmp_path: Path) -> None:
    folder = tmp_path / "g"
    gallery = _saved(folder)
    for start in (10, 20):
        _add(gallery, start)
        gallery.save(folder)
    (folder / CURRENT_FILE).write_text("v000001\n")  # set back by hand: v000002 and v000003 hold more
    rolled_back = Gallery.load(folder)
    for start in (30, 40, 50, 60):
        _add(rolled_back, start)
        rolled_back.save(folder)
    assert current_version(folder) == "v000007"
    # v000001 is in every later version; v000002 and v000003 hold entries nothing else has.
    assert sorted(p.name for p in folder.iterdir() if p.is_dir()) == [
        "v000002",
        "v000003",
        "v000005",
        "v000006",
        "v000007",
    ]


def test_ordinary_saves_still_prune_old_versions(tmp_path: Path) -> None:
    folder = tmp_path / "g"
    gallery = _saved(folder)
    for start in (10, 20, 30, 40):
        _add(gallery, start)
        gallery.save(folder)
    assert sorted(p.name for p in folder.iterdir() if p.is_dir()) == ["v000003", "v000004", "v000005"]


@pytest.mark.parametrize(
    ("change", "said"),
    [
        (lambda m: m.pop("files"), "'files' is missing"),
        (lambda m: m.update(files=["entries.csv"]), "'files' is \\['entries.csv'\\], not a mapping"),
        (lambda m: m.pop("embedder_fingerprint"), "'embedder_fingerprint' is missing"),
        (lambda m: m.update(embedder_fingerprint=5), "'embedder_fingerprint' is 5, not text"),
        (lambda m: m.update(embedding_dim="8"), "'embedding_dim' is '8', not a whole number"),
        (lambda m: m.pop("created"), "'created' is missing"),
        (lambda m: m.update(created=None), "'created' is None, not a time"),
        (lambda m: m["files"].update({"../../secret": "0" * 64}), "'files' names '../../secret', which is not a plain"),
        (lambda m: m["files"].pop("embeddings.npy"), "'files' does not list embeddings.npy"),
    ],
)
def test_a_damaged_manifest_is_named_not_a_traceback(tmp_path: Path, change, said: str) -> None:
    version = _saved(tmp_path / "g").save(tmp_path / "g")
    manifest = json.loads((version / "manifest.json").read_text())
    change(manifest)
    (version / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(
        GalleryError, match=f"manifest.json is damaged: {said}.*restore the gallery folder from a backup"
    ):
        Gallery.load(tmp_path / "g")
