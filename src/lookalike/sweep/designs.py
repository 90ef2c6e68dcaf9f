"""Experimental designs over factors (each a [train] key with its levels), as lists of settings.

- grid: every combination;
- one-at-a-time: a baseline, then each factor moved through its other levels with the rest at the baseline;
- pairwise: a covering array of strength 2, where every pair of levels of every two factors appears in at
  least one experiment, built with IPOG (Lei et al., 2007): far fewer runs than the grid (9 instead of 27
  for 3 factors of 3 levels), and what the study's hand-picked coverage design aimed at.
"""

from __future__ import annotations

import itertools
import re
from pathlib import Path
from typing import Any

from lookalike.display import base_label

Factors = dict[str, list[Any]]


def grid(factors: Factors) -> list[dict[str, Any]]:
    names = list(factors)
    return [dict(zip(names, values)) for values in itertools.product(*factors.values())]


def one_at_a_time(factors: Factors, baseline: dict[str, Any]) -> list[dict[str, Any]]:
    """The baseline (each factor at baseline's value if it is one of its levels, else at its first level), then
    one experiment per other level of each factor."""
    base = {name: baseline.get(name) if baseline.get(name) in levels else levels[0] for name, levels in factors.items()}
    rows = [base]
    for name, levels in factors.items():
        rows += [{**base, name: level} for level in levels if level != base[name]]
    return rows


def pairwise(factors: Factors) -> list[dict[str, Any]]:
    """IPOG: start from all pairs of the first two factors, then add one factor at a time, first choosing its
    level in each existing row to cover the most new pairs (horizontal growth), then adding rows for the pairs
    still uncovered (vertical growth). Deterministic: ties go to the earlier level."""
    names = list(factors)
    if len(names) < 2:
        return grid(factors)
    sizes = [len(factors[n]) for n in names]
    rows: list[list[int | None]] = [list(pair) for pair in itertools.product(range(sizes[0]), range(sizes[1]))]
    for new in range(2, len(names)):
        uncovered = {(old, a, b) for old in range(new) for a in range(sizes[old]) for b in range(sizes[new])}
        for row in rows:  # horizontal growth
            gains = [sum((old, row[old], level) in uncovered for old in range(new)) for level in range(sizes[new])]
            level = gains.index(max(gains))
            row.append(level)
            uncovered -= {(old, row[old], level) for old in range(new)}
        added: list[list[int | None]] = []
        for old, a, b in sorted(uncovered):  # vertical growth: fill a free slot of an added row, or add a row
            for row in added:
                if row[new] == b and row[old] is None:
                    row[old] = a
                    break
            else:
                row = [None] * (new + 1)
                row[old], row[new] = a, b
                added.append(row)
        rows += added
    return [{name: factors[name][level or 0] for name, level in zip(names, row)} for row in rows]


ABBREVIATIONS = {"learning_rate": "lr", "rank": "r", "alpha": "a", "max_train_steps": "steps", "lr_scheduler": "",
                 "base": "", "background_loss_weight": "bg", "loraplus_lr_ratio": "loraplus",
                 "extra_resolutions": "extra", "init_lora": "init", "train_text_encoder": "te",
                 "text_encoder_lr": "telr", "output_preservation": "dop", "adapter": "", "lokr_factor": "factor",
                 "layer_filter": "layers"}


def experiment_name(settings: dict[str, Any]) -> str:
    """A readable, unique name from the settings: lr0.0005-r16-steps1000-cosine."""
    parts = []
    for key, value in settings.items():
        if isinstance(value, list):  # extra_resolutions = [512, 768]: extra512+768 (a plain folder name)
            text = "+".join(str(item) for item in value) or "none"
        else:
            text = f"{value:g}" if isinstance(value, float) else str(value)
        if key == "base":
            text = base_label(text)
        if key == "init_lora":  # a file: its name without its folders (init-my-lora)
            text = "-" + Path(value).stem
        if key == "layer_filter":  # a pattern: its words, as a folder name may hold them (layers-single_blocks_7)
            text = "-" + "_".join(re.findall(r"[A-Za-z0-9]+", value))
        parts.append(f"{ABBREVIATIONS.get(key, key)}{text}")
    return "-".join(parts)
