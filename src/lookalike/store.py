"""results.sqlite: every run's settings, state, timings, final loss and evaluation metrics, for queries and
the report.

The files of each run stay the truth (results are files first, so a person can look); `record_run` reads them
into the store in one transaction, so the store can always be rebuilt from the workspace and is never half
updated. Several processes may record at once (a sweep's runs): SQLite serialises their writes.
"""

from __future__ import annotations

import json
import sqlite3
import time
from contextlib import closing
from pathlib import Path

from lookalike.display import trained_base
from lookalike.errors import LookalikeError
from lookalike.workspace import RunPaths, read_json, read_metrics

METRICS = ("images", "unreadable", "face_distance", "identity_similarity", "id_match_rate", "bleed_similarity",
           "faceless", "several_faces", "clip_score")
SETTINGS = ("learning_rate", "rank", "alpha", "max_train_steps", "lr_scheduler")

SCHEMA = f"""
CREATE TABLE IF NOT EXISTS runs (
    name TEXT PRIMARY KEY,
    state TEXT, reason TEXT, exit_code INTEGER,
    base TEXT,             -- the base model it was trained on
    learning_rate REAL, rank INTEGER, alpha REAL, max_train_steps INTEGER, lr_scheduler TEXT,
    train TEXT,            -- the run's whole [train] section, as JSON
    train_seconds REAL, final_loss REAL, steps_done INTEGER,
    recorded REAL
);
CREATE TABLE IF NOT EXISTS metrics (
    run TEXT NOT NULL,
    grouping TEXT NOT NULL,  -- 'run' (value ''), 'prompt' or 'guidance_scale'
    value TEXT NOT NULL,
    {", ".join(f"{name} REAL" for name in METRICS)},
    face_backend TEXT, clip_model TEXT,
    PRIMARY KEY (run, grouping, value)
);
"""


def connect(path: Path | str) -> sqlite3.Connection:
    if path != ":memory:":
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    connection = sqlite3.connect(path, timeout=60)
    connection.row_factory = sqlite3.Row
    connection.executescript(SCHEMA)
    columns = [row["name"] for row in connection.execute("PRAGMA table_info(runs)")]
    if "base" not in columns:  # a results.sqlite written before runs named their base
        connection.execute("ALTER TABLE runs ADD COLUMN base TEXT")
    measured = [row["name"] for row in connection.execute("PRAGMA table_info(metrics)")]
    for name in METRICS:
        if name not in measured:  # a results.sqlite written before this metric existed (bleed_similarity)
            connection.execute(f"ALTER TABLE metrics ADD COLUMN {name} REAL")
    return connection


def _last_step(metrics_log: Path) -> int | None:
    steps = read_metrics(metrics_log)
    return steps[-1]["step"] if steps else None


def _reason(state: str, status: dict) -> str | None:
    if state == "interrupted" and status["state"] == "running":  # killed before it could say so
        return (f"its process (pid {status.get('pid')}) is gone; `lookalike train --resume` or `lookalike sweep` "
                "continues it from its last checkpoint")
    return status.get("stale") if state == "done" else status.get("reason")


def _record(db: sqlite3.Connection, run: RunPaths) -> None:
    config = read_json(run.config) if run.config.is_file() else {}
    train = config.get("train", {})
    status = run.read_status() or {"state": "pending"}
    state = "interrupted" if status["state"] == "running" and run.state() == "interrupted" else status["state"]
    alpha = train.get("alpha") if train.get("alpha") is not None else train.get("rank")
    evaluation = run.current_metrics("final")  # of the LoRA file the run holds now, or none
    model = config.get("model", {})
    row = {"name": run.name, "state": state, "reason": _reason(state, status), "exit_code": status.get("exit_code"),
           "base": trained_base(model.get("base"), model.get("checkpoint")),
           "learning_rate": train.get("learning_rate"), "rank": train.get("rank"), "alpha": alpha,
           "max_train_steps": train.get("max_train_steps"), "lr_scheduler": train.get("lr_scheduler"),
           "train": json.dumps(train), "train_seconds": status.get("seconds"), "final_loss": status.get("final_loss"),
           "steps_done": _last_step(run.metrics), "recorded": time.time()}
    db.execute(f"INSERT OR REPLACE INTO runs ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})",
               tuple(row.values()))
    db.execute("DELETE FROM metrics WHERE run = ?", (run.name,))
    if evaluation is not None:
        groups = [("run", "", evaluation)]
        for grouping in ("prompt", "guidance_scale"):
            groups += [(grouping, value, m) for value, m in evaluation.get(f"per_{grouping}", {}).items()]
        db.executemany(
            # Columns by name: a migrated table holds an added metric last.
            f"INSERT INTO metrics (run, grouping, value, {', '.join(METRICS)}, face_backend, clip_model)"
            f" VALUES (?, ?, ?, {', '.join('?' * len(METRICS))}, ?, ?)",
            [(run.name, grouping, value, *(m.get(name) for name in METRICS), evaluation.get("face_backend"),
              evaluation.get("clip_model")) for grouping, value, m in groups])


def record_run(path: Path, run: RunPaths) -> None:
    """Write (or rewrite) the run's row and its evaluation metrics from its files, in one transaction."""
    with closing(connect(path)) as db, db:
        _record(db, run)


HIGHER_IS_BETTER = {"identity_similarity", "id_match_rate", "clip_score"}  # bleed_similarity: lower is better


def refresh(runs_folder: Path, path: Path) -> list[dict]:
    """Record every run folder of the workspace (the files are the truth), then return run_table. In a workspace
    that cannot be written (read-only), the same table is built in memory and nothing is written."""
    folders = [RunPaths(f) for f in sorted(runs_folder.glob("*")) if f.is_dir()] if runs_folder.is_dir() else []

    def recorded(target: Path | str) -> list[dict]:
        with closing(connect(target)) as db:
            with db:
                for run in folders:
                    _record(db, run)
            return run_table(db)

    try:
        return recorded(path)
    except (sqlite3.OperationalError, OSError):
        return recorded(":memory:")


def sort_runs(rows: list[dict], column: str) -> list[dict]:
    """Best first: descending for metrics where higher is better, ascending otherwise; unknown values last."""
    if rows and column not in rows[0]:
        raise LookalikeError(f"--sort: no column {column!r} (columns: {', '.join(rows[0])})")
    known = [r for r in rows if r[column] is not None]
    known.sort(key=lambda r: r[column], reverse=column in HIGHER_IS_BETTER)
    return known + [r for r in rows if r[column] is None]


def run_table(db: sqlite3.Connection) -> list[dict]:
    """One row per run: its settings, state, timings and whole-run metrics (None before evaluation)."""
    rows = db.execute(
        f"SELECT r.name, r.state, r.reason, r.base, {', '.join('r.' + s for s in SETTINGS)}, r.train_seconds,"
        f" r.final_loss, {', '.join('m.' + name for name in METRICS)}"
        " FROM runs r LEFT JOIN metrics m ON m.run = r.name AND m.grouping = 'run' ORDER BY r.name").fetchall()
    return [dict(row) for row in rows]
