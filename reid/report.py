"""The analyst's report: one HTML page, beside its thumbnails, that opens offline from the run folder.

For every encounter it shows the query pictures beside their top candidates'
best-matching gallery pictures, with scores and the decision, then the minimum
counts and every file that could not be read.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from jinja2 import Environment
from PIL import Image

from reid.catalogue import BBOX_COLUMNS
from reid.decisions import Thresholds
from reid.errors import Problem
from reid.files import atomic_write
from reid.images import ImageReadError, read_image

THUMB_PX = 180
THUMB_DIR = "thumbs"

_TEMPLATE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{{ title }}</title>
<style>
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.4em; } h2 { font-size: 1.15em; margin-top: 2em; }
table.summary { border-collapse: collapse; margin: .5em 0; }
table.summary td, table.summary th { border: 1px solid #ccc; padding: .25em .6em; text-align: left; }
.encounter { border: 1px solid #ddd; border-radius: 6px; padding: .6em; margin: .8em 0; }
.row { display: flex; gap: .8em; flex-wrap: wrap; align-items: flex-start; }
figure { margin: 0; text-align: center; font-size: .8em; max-width: {{ thumb_px }}px; }
figure img { max-width: {{ thumb_px }}px; max-height: {{ thumb_px }}px; display: block; margin: auto; }
.badge { padding: .1em .5em; border-radius: 4px; color: white; font-weight: bold; }
.known { background: #2e7d32; } .review { background: #ef6c00; } .new { background: #1565c0; }
.arrow { align-self: center; font-size: 1.5em; color: #999; }
.warn { color: #b71c1c; }
figure.evidence { max-width: {{ 3 * thumb_px }}px; } figure.evidence img { max-width: {{ 3 * thumb_px }}px; }
</style></head><body>
<h1>{{ title }}</h1>
<p>{{ summary }}</p>
{% if thresholds %}<h2>How far the decisions can be trusted</h2>
<p>Scores: {{ score_label }}. {% if thresholds.decides_known %}Known if score &ge; {{ "%.3f"|format(thresholds.known) }}{% if thresholds.margin > 0 %} and it leads the runner-up by &ge; {{ "%.3f"|format(thresholds.margin) }}{% endif %}{% else %}<b class="warn">Nothing is decided known automatically</b>{% endif %};
new if score &lt; {{ "%.3f"|format(thresholds.new) }}; review in between.</p>
{% if rates %}<table class="summary"><tr><th>error (measured on held-out labelled data)</th><th>rate</th><th>errors / decisions</th><th>95 % upper bound</th><th>target</th></tr>
{% for name, r in rates.items() %}<tr><td>{{ name }}</td><td>{{ "%.1f"|format(100 * r.rate) if r.decisions else "—" }} %</td><td>{{ r.errors }} / {{ r.decisions }}{% if r.design_effect >= 1.05 %} (as {{ "%.0f"|format(r.decisions / r.design_effect) }} independent: the errors cluster by individual){% endif %}</td>
<td class="{{ 'warn' if r.upper_bound > r.target else '' }}">{{ "%.1f"|format(100 * r.upper_bound) }} %</td><td>{{ "%.0f"|format(100 * r.target) }} %</td></tr>{% endfor %}</table>{% endif %}
{% for note in thresholds.notes %}<p class="warn">{{ note }}</p>{% endfor %}{% endif %}
{% if counts %}<h2>Number of individuals</h2>
{% if count_note %}<p>{{ count_note }}</p>{% endif %}
<table class="summary"><tr>{% for c in counts[0].keys() %}<th>{{ c }}</th>{% endfor %}</tr>
{% for row in counts %}<tr>{% for v in row.values() %}<td>{{ v }}</td>{% endfor %}</tr>{% endfor %}</table>{% endif %}
<h2>Encounters ({{ encounters|length }})</h2>
{% for e in encounters %}<div class="encounter" id="{{ e.anchor }}">
<p><span class="badge {{ e.decision }}">{{ e.decision }}</span> <b>{{ e.assigned or "—" }}</b>{% if e.margin is not none %} &nbsp; lead over the runner-up {{ "%.3f"|format(e.margin) }}{% endif %}
&nbsp; encounter {{ e.encounter_id }} &middot; {{ e.queries|length }} picture(s) &middot; {{ e.sides_searched }}</p>
<div class="row">{% for q in e.queries %}<figure><img src="{{ q.thumb }}" alt="query {{ q.name }}"><figcaption>{{ q.name }}</figcaption></figure>{% endfor %}
<span class="arrow">&rarr;</span>
{% for c in e.candidates %}<figure><img src="{{ c.thumb }}" alt="candidate {{ c.individual_id }}"><figcaption>#{{ c.rank }} <b>{{ c.individual_id }}</b><br>score {{ "%.3f"|format(c.score) }}</figcaption></figure>{% endfor %}
{% if not e.candidates %}<span>no candidate of this side in the gallery</span>{% endif %}
</div>{% set shown = e.candidates|selectattr("evidence")|list %}{% if shown %}<details><summary>verified keypoint correspondences ({{ e.queries[0].name }} vs each candidate)</summary>
<div class="row">{% for c in shown %}<figure class="evidence"><a href="{{ c.evidence }}"><img src="{{ c.evidence }}" alt="correspondences with {{ c.individual_id }}"></a><figcaption>#{{ c.rank }} {{ c.individual_id }}</figcaption></figure>{% endfor %}</div></details>{% endif %}
</div>{% endfor %}
{% if problems %}<h2 class="warn">Files that could not be used ({{ problems|length }})</h2>
<ul>{% for p in problems %}<li>{{ p }}</li>{% endfor %}</ul>{% endif %}
</body></html>
"""


def write_report(
    out_dir: str | Path,
    encounters: Sequence[Mapping[str, Any]],
    *,
    counts: pd.DataFrame | None = None,
    thresholds: Thresholds | None = None,
    count_note: str = "",
    problems: Sequence[Problem] = (),
    title: str = "leopard-reid matches",
    summary: str = "",
    score_label: str = "embedding",
) -> Path:
    """Write `report.html` into `out_dir` for the cards of `encounter_cards`; return the page's path."""
    html = (
        Environment(autoescape=True)
        .from_string(_TEMPLATE)
        .render(
            title=title,
            summary=summary,
            thresholds=thresholds,
            rates={k.replace("_", " "): v for k, v in thresholds.rates().items()} if thresholds else {},
            count_note=count_note,
            counts=_records(counts),
            encounters=encounters,
            problems=[str(p) for p in problems],
            thumb_px=THUMB_PX,
            score_label=score_label,
        )
    )
    path = Path(out_dir) / "report.html"
    with atomic_write(path) as f:
        f.write(html)
    return path


def encounter_cards(
    out_dir: str | Path,
    decisions: pd.DataFrame,
    matches: pd.DataFrame,
    queries: pd.DataFrame,
    gallery_entries: pd.DataFrame,
    *,
    evidence: Mapping[tuple[str, int], str] | None = None,
    problems: list[Problem] | None = None,
) -> list[dict[str, Any]]:
    """Return one card per encounter (what the report and the review page show), writing its thumbnails.

    `decisions` and `matches` are those of `reid.decisions.decide`; `queries` and
    `gallery_entries` are catalogue tables with the pictures. `evidence` maps
    (query annotation, gallery row) to a picture of their keypoint correspondences.
    Picture paths are relative to `out_dir`; cards hold only JSON values.
    """
    evidence = evidence or {}
    out_dir = Path(out_dir)
    (out_dir / THUMB_DIR).mkdir(parents=True, exist_ok=True)
    thumbs = _Thumbnails(out_dir, problems if problems is not None else [])
    query_rows = queries.set_index("annotation_id")
    by_query = matches.groupby("query", sort=False)
    cards = []
    for n, (encounter_id, group) in enumerate(decisions.groupby("encounter_id", sort=False)):
        first = group.iloc[0]
        ranked = by_query.get_group(first["query"]) if first["query"] in by_query.groups else matches.iloc[0:0]
        cards.append(
            {
                "anchor": f"e{n}",
                "encounter_id": str(encounter_id),
                "decision": str(first["decision"]),
                "assigned": _json_value(first["assigned_id"]),
                "reason": _json_value(first.get("reason")),
                "top_score": _json_value(first.get("top_score")),
                "sides_searched": _json_value(first["sides_searched"]),
                "margin": _json_value(first.get("margin")),
                "queries": [
                    {
                        "annotation_id": str(q),
                        "name": Path(str(query_rows.loc[q, "image_path"])).name,
                        "side": _json_value(query_rows.loc[q, "side"]),
                        "station": _json_value(query_rows.loc[q, "station"]),
                        "timestamp": _json_value(query_rows.loc[q, "timestamp"]),
                        "thumb": thumbs.of(query_rows.loc[q], f"q{n}_{k}"),
                    }
                    for k, q in enumerate(group["query"])
                ],
                "candidates": [
                    {
                        "rank": int(c["rank"]),
                        "individual_id": str(c["individual_id"]),
                        "score": float(c["score"]),
                        "thumb": thumbs.of(gallery_entries.iloc[int(c["gallery_row"])], f"g{int(c['gallery_row'])}")
                        if int(c["gallery_row"]) >= 0
                        else "",
                        "evidence": evidence.get((str(first["query"]), int(c["gallery_row"])), ""),
                    }
                    for _, c in ranked.iterrows()
                ],
            }
        )
    return cards


class _Thumbnails:
    """Writes each picture's thumbnail once; unreadable ones are added to the problems."""

    def __init__(self, out_dir: Path, problems: list[Problem]) -> None:
        self.out_dir, self.problems, self.done = out_dir, problems, {}  # type: ignore[var-annotated]

    def of(self, row: pd.Series, name: str) -> str:
        if name in self.done:
            return str(self.done[name])
        box = row[list(BBOX_COLUMNS)].to_numpy(dtype=float)
        relative = f"{THUMB_DIR}/{name}.jpg"
        try:
            crop = read_image(
                str(row["image_path"]), None if np.isnan(box).any() else box.tolist(), max_side_px=THUMB_PX
            )
            Image.fromarray(crop).save(self.out_dir / relative, quality=85)
        except ImageReadError as err:
            self.problems.append(Problem(err.path, "thumbnail", err.reason))
            relative = ""
        self.done[name] = relative
        return relative


def _json_value(value: Any) -> Any:
    """Return a table cell as a JSON value: missing -> None, timestamps as ISO 8601, numpy scalars as Python's."""
    if value is None or (not isinstance(value, str) and pd.isna(value)):
        return None
    if isinstance(value, pd.Timestamp):
        return value.isoformat()
    return value.item() if isinstance(value, np.generic) else value


def _records(table: pd.DataFrame | None) -> list[Mapping[str, Any]]:
    if table is None or table.empty:
        return []
    return [
        {str(k): v for k, v in row.items()} for row in table.astype(object).where(table.notna(), "").to_dict("records")
    ]
