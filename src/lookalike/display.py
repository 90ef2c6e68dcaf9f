"""How things look when printed: the consoles, and values in the tables and the report. One rule everywhere."""

from __future__ import annotations

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


def result_columns(rows: list[dict]) -> dict[str, str]:
    """RESULT_COLUMNS, with the base beside the run's name when the runs were trained on different bases."""
    if len({row.get("base") for row in rows}) < 2:
        return RESULT_COLUMNS
    return {"name": RESULT_COLUMNS["name"], "base": "base", **RESULT_COLUMNS}


def shown(row: dict, column: str) -> str:
    """A results row's value as the tables show it: a base by its name (a local folder by its own name)."""
    value = row[column]
    if column == "base" and value is not None:
        value = value.rstrip("/").rsplit("/", 1)[-1]
    return cell(value)


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
