"""The review page: a local web app (Flask) over one match run folder and its append-only review log.

    app = create_app("outputs/infer/2026-12-01_10-00-00", gallery_entries=Gallery.load("gallery").entries)
    serve(app, port=0)     # prints the address; Ctrl-C stops it

Everything the page needs is in the run folder (cards, thumbnails,
correspondence pictures) or in the package (page, script, style): it works
offline. Each action is appended to review.csv before the page is told it
counted, so a closed tab or a killed server loses nothing already shown as done.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading
import webbrowser
from pathlib import Path
from typing import Any

import pandas as pd
from flask import Flask, Response, jsonify, request, send_from_directory
from werkzeug.serving import BaseWSGIServer, make_server

from reid.census import count_bounds
from reid.review import NEW_LABEL, Action, EncounterState, MatchRun, ReviewError, encounter_states, reviewed_captures

log = logging.getLogger(__name__)

PAGE_DIR = Path(__file__).with_name("review_page")


def create_app(run_dir: str | Path, *, gallery_entries: pd.DataFrame | None = None, reviewer: str = "") -> Flask:
    """Return the review app of a run folder (a match, or a partner's individuals from share.py mode=shared).

    `gallery_entries` (the catalogue the run was matched against) give the IDs a
    reviewer may type in and the flanks each individual is known from, for the
    live count. The log is checked when the app is made: a bad row stops it with
    the row and the fix.
    """
    run = MatchRun.load(run_dir)
    review_log = run.log()
    known = set(gallery_entries["individual_id"].dropna().astype(str)) if gallery_entries is not None else None
    review_log.read(known_ids=known)
    cards = {str(card["encounter_id"]): card for card in run.encounters}
    captures = run.captures() if run.info.kind == "match" else None
    guard = threading.Lock()
    app = Flask(__name__, static_folder=str(PAGE_DIR), static_url_path="/page")

    def state() -> dict[str, Any]:
        rows = review_log.read()
        states = encounter_states(rows)
        labels: dict[str, str] = {}
        for row in rows.itertuples():
            label = row.individual_id
            if row.action == Action.NEW and isinstance(label, str) and label not in labels:
                labels[label] = str(row.encounter_id)
        encounters = [{**card, "review": _review_json(states.get(e))} for e, card in cards.items()]
        done = sum(e["review"]["status"] != "open" for e in encounters)
        count = None
        if captures is not None:
            decided, unresolved = reviewed_captures(captures, run.decisions, states)
            bounds = count_bounds(decided, unresolved, by=(), known_sides=gallery_entries).iloc[0]
            count = {"minimum": int(bounds["minimum"]), "maximum": int(bounds["maximum"])}
        return {
            "run": run.folder.name,
            "kind": run.info.kind,
            "gallery": run.info.gallery,
            "reviewer": reviewer,
            "encounters": encounters,
            "new_individuals": [
                {"label": label, "encounter_id": first, "thumb": _first_thumb(cards.get(first))}
                for label, first in labels.items()
            ],
            "known_ids": sorted(known or {c["individual_id"] for card in cards.values() for c in card["candidates"]}),
            "progress": {"reviewed": done, "total": len(encounters)},
            "count": count,
        }

    @app.get("/")
    def page() -> Response:
        return send_from_directory(PAGE_DIR, "index.html")

    @app.get("/files/<path:name>")
    def run_file(name: str) -> Response:
        return send_from_directory(run.folder.resolve(), name)

    @app.get("/api/state")
    def get_state() -> Response:
        return jsonify(state())

    @app.post("/api/action")
    def post_action() -> tuple[Response, int] | Response:
        body = request.get_json(silent=True) or {}
        try:
            with guard:
                row = _action_row(body, cards, review_log.read(), known)
                written = review_log.append(**row)
            log.info("%s: %s %s", written["encounter_id"], written["action"], written["individual_id"])
        except ReviewError as err:
            return jsonify({"error": str(err)}), 400
        return jsonify({"written": written, **state()})

    return app


def _action_row(
    body: dict[str, Any], cards: dict[str, dict[str, Any]], rows: Any, known: set[str] | None
) -> dict[str, Any]:
    """Return the log fields of a page's action, checked against the encounter's card."""
    encounter_id = str(body.get("encounter_id", ""))
    if encounter_id not in cards:
        raise ReviewError(f"encounter {encounter_id!r} is not in this match run; reload the page")
    card = cards[encounter_id]
    action = str(body.get("action", ""))
    row: dict[str, Any] = {"reviewer": str(body.get("reviewer", "")), "encounter_id": encounter_id, "action": action}
    if action == Action.SAME:
        rank = str(body.get("candidate_rank") or "")
        if not rank.isdigit():
            raise ReviewError(f"candidate_rank {rank!r} is not a candidate number; reload the page")
        chosen = [c for c in card["candidates"] if int(c["rank"]) == int(rank)]
        if not chosen:
            raise ReviewError(f"encounter {encounter_id} has no candidate #{rank}")
        row.update(candidate_rank=int(rank), individual_id=chosen[0]["individual_id"], score=chosen[0]["score"])
    elif action == Action.OTHER:
        typed = str(body.get("individual_id") or "").strip()
        made_here = set(rows.loc[rows["action"] == Action.NEW, "individual_id"].dropna())
        if not typed:
            raise ReviewError("type the individual's ID first")
        if not NEW_LABEL.match(typed) and known is not None and typed not in known:
            raise ReviewError(f"{typed} is not in the catalogue; check the ID, or call it a new individual")
        if NEW_LABEL.match(typed) and typed not in made_here:
            raise ReviewError(f"{typed} is not a new individual of this review yet")
        row["individual_id"] = typed
    elif action == Action.WRONG_SIDE:
        state = encounter_states(rows).get(encounter_id)
        side = state.side if state is not None and state.side else card["queries"][0]["side"]
        if side not in ("left", "right"):
            raise ReviewError(f"encounter {encounter_id}'s side is unknown: there is no other side to switch to")
        row["side"] = "right" if side == "left" else "left"
    return row


def _review_json(state: EncounterState | None) -> dict[str, Any]:
    if state is None:
        return {"status": "open", "individual_id": None, "side": None, "answers": [], "skipped": False}
    return {
        "status": state.status,
        "individual_id": state.individual_id,
        "side": state.side,
        "answers": [{"reviewer": r, "action": a, "individual_id": i} for r, a, i in state.answers],
        "skipped": state.skipped,
    }


def _first_thumb(card: dict[str, Any] | None) -> str:
    return str(card["queries"][0]["thumb"]) if card and card["queries"] else ""


def serve(app: Flask, *, host: str = "127.0.0.1", port: int = 8765, open_browser: bool = True) -> None:
    """Serve the review page until interrupted (Ctrl-C), printing its address; open a browser where there is one."""
    # Werkzeug exits the process when the port is taken: find out first, and say what to do.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as err:
            raise ReviewError(
                f"cannot serve the review page on {host}:{port} ({err.strerror}); another review page may be open "
                "there: use it, or choose another port (review.port=0 picks a free one)"
            ) from err
    server: BaseWSGIServer = make_server(host, port, app, threaded=True)
    address = f"http://{host}:{server.server_port}/"
    print(f"Review page: {address}  (Ctrl-C stops the server; every action is already saved)", flush=True)
    if open_browser and (sys.platform != "linux" or os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        try:
            webbrowser.get().open(address)
        except webbrowser.Error:
            print("No browser found here: open the address above in one.", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
