"""leopard-reid: re-identify individual leopards from camera-trap photos of their flanks.

The names below are the library's public API, for notebooks and scripts; each is
imported from its module on first use, so `import reid` stays cheap. The
workflows the entry points run live in `reid.workflows`.

    import reid
    catalogue, problems = reid.load_source(reid.import_labels_csv("kz/labels.csv", country="KZ"))
    embedder = reid.load_embedder("outputs/train/<run>/embedder")
    gallery = reid.Gallery.load("gallery")
"""

from __future__ import annotations

import importlib
import importlib.metadata
from typing import TYPE_CHECKING, Any

try:
    __version__ = importlib.metadata.version("leopard-reid")
except importlib.metadata.PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"

_EXPORTS = {
    "reid.errors": ("ReidError", "Problem"),
    "reid.catalogue": ("COLUMN_NAMES", "SIDES", "build_catalogue", "load_catalogue", "save_catalogue", "validate"),
    "reid.importers": (
        "import_camtrap_dp",
        "import_coco",
        "import_folders",
        "import_labels_csv",
        "import_megadetector",
        "import_xmp_tags",
        "load_source",
    ),
    "reid.splits": ("split_catalogue",),
    "reid.models": ("Embedder", "create_embedder", "embed_images", "export_embedder", "load_embedder"),
    "reid.metrics": ("evaluate_retrieval",),
    "reid.gallery": ("Gallery",),
    "reid.keypoints": ("KeypointConfig",),
    "reid.matchers": ("LnbnnRanker", "create_matcher"),
    "reid.fusion": ("ScoreFusion", "fit_calibration"),
    "reid.decisions": ("Decision", "MatchResult", "Thresholds", "calibrate", "decide"),
    "reid.census": ("count_individuals", "count_table"),
    "reid.aliases": ("load_aliases", "merged_catalogue", "merged_counts"),
    "reid.sharing": ("export_catalogue", "import_catalogue"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = ["__version__", *sorted(_MODULE_OF)]

if TYPE_CHECKING:
    from reid.aliases import load_aliases, merged_catalogue, merged_counts
    from reid.catalogue import COLUMN_NAMES, SIDES, build_catalogue, load_catalogue, save_catalogue, validate
    from reid.census import count_individuals, count_table
    from reid.decisions import Decision, MatchResult, Thresholds, calibrate, decide
    from reid.errors import Problem, ReidError
    from reid.fusion import ScoreFusion, fit_calibration
    from reid.gallery import Gallery
    from reid.importers import (
        import_camtrap_dp,
        import_coco,
        import_folders,
        import_labels_csv,
        import_megadetector,
        import_xmp_tags,
        load_source,
    )
    from reid.keypoints import KeypointConfig
    from reid.matchers import LnbnnRanker, create_matcher
    from reid.metrics import evaluate_retrieval
    from reid.models import Embedder, create_embedder, embed_images, export_embedder, load_embedder
    from reid.sharing import export_catalogue, import_catalogue
    from reid.splits import split_catalogue


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'reid' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
