"""share.py from the command line: the demo, then every mode on the demo's catalogues, as a user would run them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]


def _share(tmp_path: Path, run: str, *overrides: str) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        str(REPO / "share.py"),
        f"hydra.run.dir={tmp_path / run}",
        f"paths.root={tmp_path}",
        f"paths.shared_data={REPO.parent / 'shared' / 'data'}",
        "progress=false",
        *overrides,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=tmp_path)


@pytest.mark.slow
def test_share_py_demo_and_every_mode(tmp_path: Path) -> None:
    done = _share(tmp_path, "demo", "demo.population.config.n_individuals=16")
    assert done.returncode == 0, done.stderr[-3000:]
    demo = tmp_path / "demo"
    check = json.loads((demo / "truth_check.json").read_text())
    assert check["aliases_confirmed"] == check["aliases_right"] + check["aliases_wrong"] > 0
    for name in (
        "TM-catalogue.tar.gz",
        "candidates.csv",
        "report.html",
        "aliases.csv",
        "merged_counts.csv",
        "secr_captures_left.txt",
        "multimark.csv",
        "camtrap-dp-KZ/datapackage.json",
    ):
        assert (demo / name).exists(), name

    local = [f"gallery={demo / 'gallery-KZ'}", "organisation='Kazakh team'", "namespace=KZ"]
    done = _share(tmp_path, "import", "mode=import", f"archive={demo / 'TM-catalogue.tar.gz'}")
    assert done.returncode == 0, done.stderr[-3000:]
    partner = tmp_path / "partners" / "TM"
    assert (partner / "IMPORTED.json").is_file()
    # Importing into a local gallery folder is refused, and says why.
    done = _share(
        tmp_path, "bad", "mode=import", f"archive={demo / 'TM-catalogue.tar.gz'}", f"partners={demo / 'gallery-KZ'}"
    )
    assert done.returncode == 1 and "gallery folder" in done.stdout + done.stderr

    done = _share(tmp_path, "shared", "mode=shared", f"partner={partner}", f"embedder={demo / 'embedder'}", *local)
    assert done.returncode == 0, done.stderr[-3000:]
    candidates = pd.read_csv(tmp_path / "shared" / "candidates.csv", dtype=str, keep_default_na=False)
    assert (tmp_path / "shared" / "report.html").is_file()
    reviewed = candidates.assign(confirmed=(candidates["decision"] == "known").map({True: "yes", False: ""}))
    reviewed.to_csv(tmp_path / "reviewed.csv", index=False)
    done = _share(
        tmp_path,
        "confirm",
        "mode=confirm",
        f"candidates={tmp_path / 'reviewed.csv'}",
        f"partner={partner}",
        "confirmed_by='Test Reviewer'",
        f"aliases={tmp_path / 'aliases.csv'}",
        *local,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    aliases = pd.read_csv(tmp_path / "aliases.csv")
    assert len(aliases) == (candidates["decision"] == "known").sum()
    assert set(aliases["partner_namespace"]) <= {"TM"} and set(aliases["local_namespace"]) <= {"KZ"}

    done = _share(tmp_path, "count", "mode=count", f"partner={partner}", f"aliases={tmp_path / 'aliases.csv'}", *local)
    assert done.returncode == 0, done.stderr[-3000:]
    counts = pd.read_csv(tmp_path / "count" / "counts.csv")
    assert counts.loc[counts["country"] == "all", "minimum"].iloc[0] == check["merged_minimum"]

    for mode, expected in (("capture_histories", "multimark.csv"), ("camtrap_dp", "camtrap-dp/datapackage.json")):
        done = _share(tmp_path, mode, f"mode={mode}", *local)
        assert done.returncode == 0, done.stderr[-3000:]
        assert (tmp_path / mode / expected).is_file()
