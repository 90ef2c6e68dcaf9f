"""What each swept factor did: for every key the sweep's experiments set to more than one level, the mean of
each metric over the finished runs at each level (each level's runs share it and differ in the other factors, so
in a grid every other level is averaged over equally)."""

from __future__ import annotations

import html
from statistics import mean

from lookalike.config import StudyConfig
from lookalike.display import base_label, cell
from lookalike.sweep.plan import experiments

EFFECTS_TITLE = "What each swept factor did (means over each level's finished runs)"
COLUMNS = ("runs", "identity", "bleed", "CLIP", "faceless share")  # bleed: where a prompt names nobody


def _mean(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return mean(present) if present else None


def factor_effects(config: StudyConfig, done: list[dict]) -> dict[str, list[tuple[str, list[str]]]]:
    """{factor: [(level, its cells under COLUMNS)]} for every factor with two or more levels among `done` (results
    rows of finished runs); runs that do not set a factor are left out of its table."""
    rows = {row["name"]: row for row in done}
    settings = {e.name: e.overrides for e in experiments(config) if e.name in rows}
    factors = dict.fromkeys(key for overrides in settings.values() for key in overrides)
    effects = {}
    for factor in factors:
        levels: dict[str, list[dict]] = {}
        for name, overrides in settings.items():
            if factor in overrides:
                value = overrides[factor]
                levels.setdefault(base_label(value) if factor == "base" else str(value), []).append(rows[name])
        if len(levels) < 2:
            continue
        effects[factor] = [(level, [str(len(runs)), cell(_mean([r["identity_similarity"] for r in runs])),
                                    cell(_mean([r.get("bleed_similarity") for r in runs])),
                                    cell(_mean([r["clip_score"] for r in runs])),
                                    cell(_mean([r["faceless"] / r["images"] if r["images"] else None for r in runs]))])
                           for level, runs in levels.items()]
    return effects


def effects_markdown(effects: dict[str, list[tuple[str, list[str]]]]) -> list[str]:
    lines = []
    for factor, levels in effects.items():
        lines += ["", f"| {factor} | " + " | ".join(COLUMNS) + " |", "|" + "---|" * (len(COLUMNS) + 1)]
        lines += [f"| {level} | " + " | ".join(cells) + " |" for level, cells in levels]
    return lines


def effects_html(effects: dict[str, list[tuple[str, list[str]]]]) -> str:
    tables = []
    for factor, levels in effects.items():
        head = f"<th>{html.escape(factor)}</th>" + "".join(f"<th>{c}</th>" for c in COLUMNS)
        body = "".join(f"<tr><td>{html.escape(level)}</td>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>"
                       for level, cells in levels)
        tables.append(f"<table><tr>{head}</tr>{body}</table>")
    return "".join(tables)
