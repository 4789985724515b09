"""The analyst's loop: the review log, the review page in a real browser, enrolment and the recount.

A small world: 6 individuals x 2 flanks x 3 encounters x 2 frames. The gallery
holds the first encounter of individuals 0-3; the card to review holds their
other encounters and every encounter of individuals 4 and 5, which the gallery
has never seen. The gallery is not calibrated, so every encounter goes to review.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch
from conftest import write_flank_catalogue

from reid.census import count_bounds
from reid.gallery import Gallery
from reid.models import create_embedder, export_embedder, load_embedder
from reid.review import MatchRun, ReviewError, encounter_states, find_match_run
from reid.workflows import build_gallery, enrol_reviewed, find_shared_individuals, match, recount
from reid.workflows.shared import reviewed_pairs

REPO = Path(__file__).resolve().parents[1]
GALLERY_INDIVIDUALS = {f"KZ-{i:04d}" for i in range(4)}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("review")
    (root / "images").mkdir()
    table = write_flank_catalogue(root / "images", n_individuals=6).assign(country="KZ")
    first = table["encounter_id"].str.endswith("-0")
    in_gallery = table["individual_id"].isin(GALLERY_INDIVIDUALS) & first
    torch.manual_seed(0)
    folder = export_embedder(create_embedder("test_convnext", 16, img_size=64, crop_margin=0.05), root / "embedder")
    embedder = load_embedder(folder)
    build_gallery(table[in_gallery], embedder, root / "gallery", progress=False)
    queries = table[~in_gallery].drop(columns="individual_id").reset_index(drop=True)
    match(
        queries, embedder, Gallery.load(root / "gallery"), root / "runs" / "card1", k=10, evidence=False, progress=False
    )
    truth = table[~in_gallery].set_index("annotation_id")["individual_id"]
    return {
        "root": root,
        "embedder": embedder,
        "run": root / "runs" / "card1",
        "truth": truth,
        "queries": table[~in_gallery],
    }


@pytest.fixture
def run_copy(world: dict[str, Any], tmp_path: Path) -> Path:
    """A fresh copy of the match run (without a review log) and of its gallery, for tests that write."""
    shutil.copytree(world["root"] / "gallery", tmp_path / "gallery")
    shutil.copytree(world["run"], tmp_path / "run", ignore=shutil.ignore_patterns("review.csv"))
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    info["gallery"] = str(tmp_path / "gallery")
    (tmp_path / "run" / "run.json").write_text(json.dumps(info))
    return tmp_path / "run"


def _truth_by_encounter(run: MatchRun, truth: pd.Series) -> dict[str, str]:
    readable = run.decisions.dropna(subset=["encounter_id"])
    return {str(e): str(truth[q]) for q, e in zip(readable["query"], readable["encounter_id"], strict=True)}


def test_match_run_holds_what_review_and_enrolment_need(world: dict[str, Any]) -> None:
    run = MatchRun.load(world["run"])
    assert len(run.captures()) == len(world["truth"])
    assert {c["encounter_id"] for c in run.encounters} == set(run.decisions["encounter_id"])
    assert set(run.decisions["decision"]) == {"review"}  # not calibrated: a person decides everything
    card = run.encounters[0]
    assert card["candidates"] and (world["run"] / card["candidates"][0]["thumb"]).is_file()
    assert run.info.gallery_id == Gallery.load(world["root"] / "gallery").identity
    assert find_match_run(world["root"] / "runs") == world["run"]


def test_each_reviewers_latest_answer_counts_and_disagreement_is_a_conflict(run_copy: Path) -> None:
    log = MatchRun.load(run_copy).log()
    log.append(reviewer="ana", encounter_id="E1", action="same", individual_id="KZ-0001", candidate_rank=1)
    log.append(reviewer="ana", encounter_id="E1", action="other", individual_id="KZ-0002")  # changed her mind
    log.append(reviewer="ben", encounter_id="E1", action="other", individual_id="KZ-0002")
    log.append(reviewer="ana", encounter_id="E2", action="new")
    log.append(reviewer="ben", encounter_id="E2", action="new")  # another new animal, by his count
    log.append(reviewer="ana", encounter_id="E3", action="unusable")
    log.append(reviewer="ana", encounter_id="E4", action="skip")
    log.append(reviewer="ana", encounter_id="E5", action="wrong_side", side="right")
    states = encounter_states(log.read())
    assert (states["E1"].status, states["E1"].individual_id) == ("confirmed", "KZ-0002")
    assert states["E2"].status == "conflict" and {a[2] for a in states["E2"].answers} == {"new-1", "new-2"}
    assert states["E3"].status == "unusable"
    assert states["E4"].status == "open" and states["E4"].skipped
    assert states["E5"].status == "open" and states["E5"].side == "right"
    assert len(log.read()) == 8  # append-only: nothing was overwritten


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda r: r.assign(action=r["action"].where(r.index != 1, "merge")), "row 3: action 'merge' is not one of"),
        (
            lambda r: r.assign(individual_id=r["individual_id"].where(r.index != 0, "KZ-9999")),
            "row 2: individual 'KZ-9999'",
        ),
        (lambda r: r.assign(run_id="another-run"), "row 2: made for another match run"),
        (lambda r: r.drop(columns="reviewer"), "columns reviewer are missing"),
        (lambda r: r.assign(reviewer="Sérik"), "not UTF-8 text"),  # saved by a spreadsheet in Latin-1
    ],
)
def test_a_hand_edited_log_is_refused_by_row_and_nothing_is_enrolled(
    world: dict[str, Any], run_copy: Path, edit: Any, expected: str
) -> None:
    run = MatchRun.load(run_copy)
    log = run.log()
    encounters = list(run.decisions["encounter_id"].dropna().unique())
    log.append(reviewer="ana", encounter_id=encounters[0], action="other", individual_id="KZ-0001")
    log.append(reviewer="ana", encounter_id=encounters[1], action="new")
    edited = edit(pd.read_csv(log.path, dtype=str, keep_default_na=False))
    edited.to_csv(log.path, index=False, encoding="latin-1" if "Sérik" in set(edited.get("reviewer", [])) else "utf-8")
    gallery = run_copy.parent / "gallery"
    before = (gallery / "CURRENT").read_text()
    with pytest.raises(ReviewError, match=expected):
        enrol_reviewed(run_copy, world["embedder"], progress=False)
    assert (gallery / "CURRENT").read_text() == before


def test_enrolling_into_another_gallery_is_refused(world: dict[str, Any], run_copy: Path, tmp_path: Path) -> None:
    other = tmp_path / "other-gallery"
    build_gallery(world["queries"].head(4), world["embedder"], other, progress=False)
    with pytest.raises(ReviewError, match="matched against another gallery"):
        enrol_reviewed(run_copy, world["embedder"], other, progress=False)


def test_two_tabs_writing_at_once_lose_nothing_and_never_share_a_new_label(run_copy: Path) -> None:
    log = MatchRun.load(run_copy).log()

    def review(reviewer: str) -> None:
        for n in range(15):
            log.append(reviewer=reviewer, encounter_id=f"{reviewer}-{n}", action="new")

    tabs = [threading.Thread(target=review, args=(name,)) for name in ("ana", "ben")]
    for tab in tabs:
        tab.start()
    for tab in tabs:
        tab.join()
    rows = log.read()
    assert len(rows) == 30 and sorted(rows["individual_id"]) == sorted(f"new-{n}" for n in range(1, 31))


def test_a_partial_last_row_from_a_crash_is_dropped_and_the_log_goes_on(run_copy: Path) -> None:
    log = MatchRun.load(run_copy).log()
    log.append(reviewer="ana", encounter_id="E1", action="other", individual_id="KZ-0001")
    with open(log.path, "a") as f:
        f.write("deadbeef,2026-12-01T00:00:00+00:00,ana")  # the machine stopped here
    assert len(log.read()) == 1
    log.append(reviewer="ana", encounter_id="E2", action="unusable")
    assert list(log.read()["encounter_id"]) == ["E1", "E2"]


def test_a_partners_individuals_confirmed_on_the_review_page_become_alias_pairs(
    world: dict[str, Any], tmp_path: Path
) -> None:
    local = Gallery.load(world["root"] / "gallery")
    partner = Gallery.load(world["root"] / "gallery")  # the partner holds the same animals under the same IDs
    find_shared_individuals(local, partner, partner.entries, tmp_path / "shared", progress=False)
    run = MatchRun.load(tmp_path / "shared")
    assert run.info.kind == "shared" and {c["encounter_id"] for c in run.encounters} == GALLERY_INDIVIDUALS
    log = run.log()
    log.append(reviewer="ana", encounter_id="KZ-0001", action="other", individual_id="KZ-0001")
    log.append(reviewer="ben", encounter_id="KZ-0001", action="other", individual_id="KZ-0001")
    log.append(reviewer="ana", encounter_id="KZ-0002", action="new")  # not one of ours: no alias
    log.append(reviewer="ana", encounter_id="KZ-0003", action="other", individual_id="KZ-0003")
    log.append(reviewer="ben", encounter_id="KZ-0003", action="other", individual_id="KZ-0000")  # a conflict
    pairs = reviewed_pairs(tmp_path / "shared")
    assert list(pairs) == ["ana; ben"]
    assert pairs["ana; ben"][["partner_id", "local_id", "confirmed"]].values.tolist() == [["KZ-0001", "KZ-0001", "yes"]]
    with pytest.raises(ReviewError, match=r"share\.py mode=confirm"):
        enrol_reviewed(tmp_path / "shared", world["embedder"], progress=False)


def _post(address: str, **body: Any) -> dict[str, Any]:
    request = urllib.request.Request(
        address + "api/action", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())  # type: ignore[no-any-return]


def _start_server(run: Path) -> tuple[subprocess.Popen[str], str]:
    command = [
        sys.executable,
        "infer.py",
        "mode=review",
        f"review.run={run}",
        "review.port=0",
        "review.open_browser=false",
        f"hydra.run.dir={run.parent / 'review-server'}",
    ]
    server = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert server.stdout is not None
    for line in server.stdout:
        if line.startswith("Review page: "):
            return server, line.split()[2]
    raise AssertionError(f"the review server did not start: {server.wait()}")


@pytest.mark.slow
def test_killing_the_server_loses_no_action_already_made(world: dict[str, Any], run_copy: Path) -> None:
    run = MatchRun.load(run_copy)
    truth = _truth_by_encounter(run, world["truth"])
    server, address = _start_server(run_copy)
    made = []
    try:
        for encounter_id in list(truth)[:5]:
            answer = _post(
                address, reviewer="ana", encounter_id=encounter_id, action="other", individual_id=truth[encounter_id]
            )
            made.append(answer["written"]["action_id"])
    finally:
        server.send_signal(signal.SIGKILL)
        server.wait()
    assert list(run.log().read()["action_id"]) == made
    server, address = _start_server(run_copy)  # reopened: it resumes where the reviewer stopped
    try:
        with urllib.request.urlopen(address + "api/state", timeout=30) as response:
            state = json.loads(response.read())
    finally:
        server.send_signal(signal.SIGINT)
        server.wait()
    assert state["progress"]["reviewed"] == 5


def test_a_malformed_action_is_refused_with_a_message_and_not_written(run_copy: Path) -> None:
    from reid.review_app import create_app

    client = create_app(run_copy).test_client()
    encounter_id = MatchRun.load(run_copy).encounters[0]["encounter_id"]
    for body in (
        {"reviewer": "ana", "encounter_id": encounter_id, "action": "same", "candidate_rank": "first"},
        {"reviewer": "ana", "encounter_id": encounter_id, "action": "same", "candidate_rank": 99},
        {"reviewer": "ana", "encounter_id": "nowhere", "action": "new"},
        {"reviewer": "", "encounter_id": encounter_id, "action": "new"},
        {"reviewer": "ana", "encounter_id": encounter_id, "action": "other", "individual_id": "new-7"},
    ):
        answer = client.post("/api/action", json=body)
        assert answer.status_code == 400 and answer.get_json()["error"]
    assert len(MatchRun.load(run_copy).log().read()) == 0


def test_a_port_in_use_is_one_clear_line(run_copy: Path) -> None:
    from werkzeug.serving import make_server

    from reid.review_app import create_app, serve

    app = create_app(run_copy)
    busy = make_server("127.0.0.1", 0, app)
    try:
        with pytest.raises(ReviewError, match=r"review\.port=0 picks a free one"):
            serve(app, port=busy.server_port, open_browser=False)
    finally:
        busy.server_close()


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.fixture
def page_server(run_copy: Path) -> Iterator[str]:
    """The review page of `run_copy`, served in this process on a free port."""
    from werkzeug.serving import make_server

    from reid.review_app import create_app

    entries = Gallery.load(run_copy.parent / "gallery").entries
    server = make_server("127.0.0.1", 0, create_app(run_copy, gallery_entries=entries), threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/"
    server.shutdown()


@pytest.mark.slow
def test_the_whole_loop_in_a_browser_recounts_the_truth(
    world: dict[str, Any], run_copy: Path, page_server: str
) -> None:
    playwright_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (a dev dependency)")
    browser_path = _chromium()
    if browser_path is None:
        pytest.skip("chromium is not installed (apt-get install chromium); .ci/run installs it")
    run = MatchRun.load(run_copy)
    truth = _truth_by_encounter(run, world["truth"])
    labels: dict[str, str] = {}  # true individual -> the new-individual label the review gave it
    flags = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"]
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=browser_path, args=flags)
        page = browser.new_page()
        page.goto(page_server)
        page.fill("#reviewer", "ana")
        for n in range(len(truth)):
            if n == len(truth) // 2:  # the browser is closed and opened again half way
                page.reload()
                expect = f"reviewed {n} / {len(truth)}"
                playwright_api.expect(page.get_by_test_id("progress")).to_contain_text(expect)
            encounter_id = page.locator("#encounter h2").get_attribute("data-encounter")
            true_id = truth[encounter_id]
            by_keys = n % 2 == 1
            ranks = page.locator("button[data-action=same]")
            candidates = [page.locator("figure.candidate b").nth(i).inner_text() for i in range(ranks.count())]
            if true_id in candidates:
                rank = candidates.index(true_id) + 1
                page.keyboard.press(str(rank)) if by_keys else ranks.nth(rank - 1).click()
            elif true_id in GALLERY_INDIVIDUALS or true_id in labels:
                known_as = labels.get(true_id, true_id)
                if by_keys:
                    page.keyboard.press("i")
                    page.keyboard.type(known_as)
                    page.keyboard.press("Enter")
                else:
                    page.fill("#typed-id", known_as)
                    page.click("button[data-action=other]:has-text('Same as this ID')")
            else:
                page.keyboard.press("n") if by_keys else page.click("button[data-action=new]")
                page.wait_for_selector("#message:has-text('Saved')")
                labels[true_id] = page.locator("#message").inner_text().split()[-1].rstrip(".")
            playwright_api.expect(page.get_by_test_id("progress")).to_contain_text(f"reviewed {n + 1} / ")
        # Every encounter identified as the truth says: the live count on the page is the true count.
        truth_count = world["queries"]["individual_id"].nunique()
        playwright_api.expect(page.get_by_test_id("progress")).to_contain_text(
            f"at least {truth_count}, at most {truth_count}"
        )
        page.screenshot(path=str(run_copy / "review-page.png"))
        browser.close()
    states = encounter_states(run.log().read())
    assert all(s.status == "confirmed" for s in states.values()) and len(states) == len(truth)

    enrolled, problems = enrol_reviewed(run_copy, world["embedder"], progress=False)
    assert len(enrolled) == len(world["truth"]) and not [p for p in problems if "disagree" in str(p)]
    gallery = Gallery.load(run_copy.parent / "gallery")
    stored = gallery.entries.set_index("image_path")["individual_id"]
    for path, true_id in zip(world["queries"]["image_path"], world["queries"]["individual_id"], strict=True):
        assert stored[path] == true_id if true_id in GALLERY_INDIVIDUALS else stored[path].startswith("KZ-")
    again, _ = enrol_reviewed(run_copy, world["embedder"], progress=False)
    assert len(Gallery.load(run_copy.parent / "gallery")) == len(gallery)  # nothing twice
    assert list(again["individual_id"]) == list(enrolled["individual_id"])  # the same IDs again
    assert set(enrolled["status"]) == {"enrolled"} and set(again["status"]) == {"already in the gallery"}

    table, individuals, pending = recount(run_copy)
    captures = run.captures().assign(individual_id=lambda t: t["annotation_id"].map(world["truth"]).astype("string"))
    expected = count_bounds(captures, captures.iloc[0:0], known_sides=gallery.entries).iloc[0]
    assert (table.iloc[0]["minimum"], table.iloc[0]["maximum"]) == (expected["minimum"], expected["maximum"])
    assert pending == [] and len(individuals) == world["queries"]["individual_id"].nunique()
