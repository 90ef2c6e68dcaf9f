"""How things look when printed: the consoles, and values in the tables and the report. One rule everywhere."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console


def console(**options) -> Console:
    """A console that prints text as it is: paths, file names, tokens and reasons are the user's text, and
    Rich's markup would eat their square brackets ('[old]') or fail on them ('[/b]')."""
    return Console(markup=False, **options)


# The columns of a study's results (a results.sqlite row: store.run_table) and their labels, in the printed
# table (`lookalike results`) and the report alike.
# Short labels: all fifteen fit a 140-column terminal.
RESULT_COLUMNS = {"name": "run", "state": "state", "learning_rate": "lr", "rank": "rank", "alpha": "alpha",
                  "max_train_steps": "steps", "lr_scheduler": "sched", "train_seconds": "train s",
                  "final_loss": "loss", "face_distance": "face dist", "identity_similarity": "identity",
                  "id_match_rate": "id match", "faceless": "faceless", "several_faces": "several",
                  "clip_score": "CLIP"}


def several_bases(rows: list[dict]) -> bool:
    """Whether these results rows were trained on different bases (then every table names each run's base)."""
    return len({row.get("base") for row in rows}) > 1


def result_columns(rows: list[dict]) -> dict[str, str]:
    """RESULT_COLUMNS, with the base beside the run's name when the runs were trained on different bases, and
    bleed beside identity when a run measured it (its prompts name nobody too)."""
    columns = dict(RESULT_COLUMNS)
    if any(row.get("bleed_similarity") is not None for row in rows):
        at = list(columns).index("identity_similarity") + 1
        columns = dict([*list(columns.items())[:at], ("bleed_similarity", "bleed"), *list(columns.items())[at:]])
    if several_bases(rows):
        columns = {"name": columns["name"], "base": "base", **columns}
    return columns


def trained_base(base: str | None, checkpoint) -> str | None:
    """A run's base as tables and pages name it: model.base, with the single-file fine-tune it trained on
    (model.checkpoint) after it, so that a fine-tune's runs are never shown as the base's."""
    return base if checkpoint is None else f"{base} + {Path(checkpoint).name}"


def base_label(base: str) -> str:
    """A base as tables and run names show it: a known base's name, or a local folder's own name."""
    return Path(base).name


def shown(row: dict, column: str) -> str:
    """A results row's value as the tables show it: a base by its label."""
    value = row[column]
    return cell(base_label(value) if column == "base" and value is not None else value)


def cell(value, signed: bool = False) -> str:
    """'-' for a missing value, 4 significant digits for a number with a fraction, anything else as it is;
    signed: a change, shown with its sign."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:+.4g}" if signed else f"{value:.4g}"
    if signed and isinstance(value, int) and not isinstance(value, bool):
        return f"{value:+d}"
    return str(value)
