"""The workflows the entry points run, one module per workflow; nothing else in `reid` imports this package.

- `build`: build or extend a gallery from a labelled catalogue (`infer.py mode=build`)
- `calibrate`: calibrate scores and decision thresholds (`infer.py mode=calibrate`)
- `match`: search, re-score, decide, report (`infer.py mode=match`)
- `count`: minimum and maximum counts of a catalogue (`infer.py mode=count`)
- `review`: the review page, enrolment of what a person confirmed, recount (`infer.py mode=review|enrol`)
- `shared`: individuals shared with a partner catalogue, confirmed aliases, exports (`share.py`)
- `demo`: every step on synthetic data with a truth check (`infer.py`, `share.py` without a mode)

Each `run_*` function is one mode: it takes plain, already built objects and
returns an `Outcome` (files written, problems met, a summary to print).
"""

from reid.workflows.build import build_gallery, run_build
from reid.workflows.calibrate import CalibrationSettings, calibrate_gallery, calibrate_thresholds, run_calibrate
from reid.workflows.common import Outcome, run_mode
from reid.workflows.count import run_count
from reid.workflows.demo import evaluate_against_truth, run_infer_demo, run_share_demo
from reid.workflows.match import match, run_match, score_queries
from reid.workflows.review import enrol_reviewed, recount, run_enrol, run_recount, run_review
from reid.workflows.shared import (
    find_shared_individuals,
    partner_gallery,
    run_camtrap_dp,
    run_capture_histories,
    run_confirm,
    run_export,
    run_import,
    run_merged_count,
    run_shared,
)

__all__ = [
    "CalibrationSettings",
    "Outcome",
    "build_gallery",
    "calibrate_gallery",
    "calibrate_thresholds",
    "enrol_reviewed",
    "evaluate_against_truth",
    "find_shared_individuals",
    "match",
    "partner_gallery",
    "recount",
    "run_build",
    "run_calibrate",
    "run_camtrap_dp",
    "run_capture_histories",
    "run_confirm",
    "run_count",
    "run_enrol",
    "run_export",
    "run_import",
    "run_infer_demo",
    "run_match",
    "run_merged_count",
    "run_mode",
    "run_recount",
    "run_review",
    "run_share_demo",
    "run_shared",
    "score_queries",
]
