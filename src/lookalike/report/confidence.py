"""How sure the report can be of its numbers. A run's mean identity similarity and CLIP Score come from a few
dozen images, so each gets a 95% bootstrap interval over its images (scipy.stats.bootstrap, with a fixed seed, so
that a report is the same each time it is built). The best run's lead over each other finished run is then
bootstrapped over the images both runs drew with the same prompt, seed, guidance and strength: a lead whose
interval holds 0 is within the spread of the images, not a result."""

from __future__ import annotations

import csv
import html
from pathlib import Path

import numpy as np

from lookalike.display import cell

CONFIDENCE_TITLE = "How sure: 95% intervals over each run's images"
MEASURED = (("identity_similarity", "identity"), ("clip_score", "CLIP"))
RESAMPLES = 2000


def image_scores(scores_csv: Path) -> list[dict]:
    """evaluate's per-image rows (scores.csv), with their numbers as floats (None where there is none; no identity
    for an image whose prompt names nobody, as the run's likeness leaves it out)."""
    if not scores_csv.is_file():
        return []
    with scores_csv.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        for key, _ in MEASURED:
            row[key] = float(row[key]) if row.get(key) else None
        if row.get("names_person") == "False":  # its prompt names nobody: it measures bleed, not likeness
            row["identity_similarity"] = None
    return rows


def interval(values: list[float]) -> tuple[float, float] | None:
    """The 95% percentile-bootstrap interval of the mean of `values`; None for fewer than two."""
    from scipy.stats import bootstrap

    if len(values) < 2:
        return None
    if min(values) == max(values):  # every resample has the same mean
        return values[0], values[0]
    found = bootstrap((np.asarray(values),), np.mean, confidence_level=0.95, n_resamples=RESAMPLES,
                      method="percentile", random_state=np.random.default_rng(0))
    return float(found.confidence_interval.low), float(found.confidence_interval.high)


def _drawn_alike(row: dict) -> tuple:
    return row["prompt"], row["seed"], row["guidance_scale"], row.get("lora_scale", "")


def paired_lead(best: list[dict], other: list[dict], metric: str) -> tuple[float, tuple[float, float] | None, int]:
    """(mean of best - other, its 95% interval, pairs) over the images the two runs drew alike where both have
    the metric (a face, for identity)."""
    theirs = {_drawn_alike(row): row[metric] for row in other if row[metric] is not None}
    differences = [row[metric] - theirs[_drawn_alike(row)] for row in best
                   if row[metric] is not None and theirs.get(_drawn_alike(row)) is not None]
    if not differences:
        return float("nan"), None, 0
    return float(np.mean(differences)), interval(differences), len(differences)


def confidence(scores: dict[str, list[dict]], best: str | None) -> tuple[list[list[str]], list[str]]:
    """(a table row per run: name, images, then each measure's mean and interval; a line per comparison of the best
    run with each other run, saying whether its lead is more than the images' spread)."""
    table = []
    for name, rows in scores.items():
        cells = [name, str(len(rows))]
        for metric, _ in MEASURED:
            values = [row[metric] for row in rows if row[metric] is not None]
            found = interval(values)
            cells.append("-" if not values else f"{cell(float(np.mean(values)))} "
                         + (f"[{cell(found[0])}, {cell(found[1])}]" if found else "(one image)"))
        table.append(cells)
    lines = []
    for other in [name for name in scores if best in scores and name != best]:
        for metric, label in MEASURED:
            lead, found, pairs = paired_lead(scores[best], scores[other], metric)
            if found is None:
                continue
            verdict = "a lead beyond the images' spread" if found[0] > 0 or found[1] < 0 else \
                "within the images' spread: not a result"
            lines.append(f"{best} against {other}, {label}: {cell(lead, signed=True)} "
                         f"[{cell(found[0], signed=True)}, {cell(found[1], signed=True)}] over {pairs} images drawn "
                         f"alike, {verdict}")
    return table, lines


HEADER = ["run", "images", *(f"{label} mean [95% interval]" for _, label in MEASURED)]


def confidence_markdown(table: list[list[str]], lines: list[str]) -> list[str]:
    return (["", f"## {CONFIDENCE_TITLE}", "", "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
            + ["| " + " | ".join(row) + " |" for row in table] + ([""] + [f"- {line}" for line in lines]))


def confidence_html(table: list[list[str]], lines: list[str]) -> str:
    head = "".join(f"<th>{html.escape(title)}</th>" for title in HEADER)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(value)}</td>" for value in row) + "</tr>" for row in table)
    said = "".join(f"<li>{html.escape(line)}</li>" for line in lines)
    return f"<h2>{CONFIDENCE_TITLE}</h2><table><tr>{head}</tr>{body}</table>" + (f"<ul>{said}</ul>" if said else "")
