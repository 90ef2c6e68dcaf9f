"""The report's figures (matplotlib, PNG), each a function of plain data that returns its Figure:

- a metric against one factor (learning rate, rank, steps), one line per setting of the other factors
  (the study's figures 6-9);
- face distance against CLIP Score, the Pareto front marked;
- each metric against the inference guidance scale and against the LoRA strength, one line per run;
- training loss curves of every run;
- identity similarity and CLIP Score of every run's scored samples against the step, its best step marked.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display here, and none needed
import matplotlib.pyplot as plt  # noqa: E402

METRICS = {"face_distance": "face distance (lower is better)", "identity_similarity": "identity similarity",
           "clip_score": "CLIP Score", "faceless": "images without a face"}
FACTORS = {"learning_rate": "learning rate", "rank": "LoRA rank", "max_train_steps": "training steps"}
SETTINGS = ("learning_rate", "rank", "max_train_steps", "lr_scheduler")


def _label(row: dict, keys) -> str:
    short = {"learning_rate": "lr", "rank": "r", "max_train_steps": "steps", "lr_scheduler": ""}
    return " ".join(f"{short[k]}{row[k]:g}" if isinstance(row[k], float) else f"{short[k]}{row[k]}" for k in keys)


def factor_figure(rows: list[dict], factor: str):
    """Each metric against `factor`; one line per combination of the other settings (runs that share it)."""
    others = [k for k in SETTINGS if k != factor]
    figure, axes = plt.subplots(1, len(METRICS), figsize=(4.2 * len(METRICS), 3.6), squeeze=False)
    groups = itertools.groupby(sorted(rows, key=lambda r: [str(r[k]) for k in others]),
                               key=lambda r: tuple(r[k] for k in others))
    for _, members in groups:
        members = sorted(members, key=lambda r: r[factor])
        for axis, metric in zip(axes[0], METRICS):
            points = [(r[factor], r[metric]) for r in members if r[metric] is not None]
            if points:
                axis.plot(*zip(*points), marker="o", label=_label(members[0], others))
    for axis, (metric, title) in zip(axes[0], METRICS.items()):
        _say_when_empty(axis, metric)
        axis.set_xlabel(FACTORS[factor])
        axis.set_title(title, fontsize=10)
        if factor == "learning_rate":
            axis.set_xscale("log")
        axis.grid(alpha=0.3)
    _legend(axes[0][0])
    figure.tight_layout()
    return figure


NOTHING_TO_PLOT = {"face_distance": "no face in any image: nothing to plot",
                   "identity_similarity": "no face in any image: nothing to plot"}


def _say_when_empty(axis, metric: str) -> None:
    """An axis with no point says why in one line, instead of standing empty."""
    if not axis.lines:
        axis.text(0.5, 0.5, NOTHING_TO_PLOT.get(metric, "no values yet: nothing to plot"), ha="center",
                  va="center", fontsize=9, color="dimgray", transform=axis.transAxes, wrap=True)


def _legend(axis) -> None:
    if axis.get_legend_handles_labels()[0]:
        axis.legend(fontsize=7, loc="best")


def pareto_figure(rows: list[dict], front: list[str]):
    """Face distance against CLIP Score for every evaluated run; the best runs (the Pareto front) marked."""
    figure, axis = plt.subplots(figsize=(6, 4.5))
    shown = [r for r in rows if r["face_distance"] is not None and r["clip_score"] is not None]
    for row in shown:
        best = row["name"] in front
        axis.scatter(row["clip_score"], row["face_distance"], s=60 if best else 30,
                     color="tab:red" if best else "tab:gray", zorder=3 if best else 2)
        axis.annotate(row["name"], (row["clip_score"], row["face_distance"]), fontsize=7,
                      xytext=(4, 4), textcoords="offset points")
    axis.set_xlabel("CLIP Score (higher is better)")
    axis.set_ylabel("face distance (lower is better)")
    axis.set_title("red: the best runs (Pareto front of identity, CLIP, face failures)", fontsize=9)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    return figure


def inference_figure(per_value: dict[str, dict[str, dict]], factor: str):
    """Each metric against an inference factor (the guidance scale, the LoRA strength); per_value: run -> the
    factor's value -> metrics."""
    figure, axes = plt.subplots(1, len(METRICS), figsize=(4.2 * len(METRICS), 3.6), squeeze=False)
    for run, by_scale in sorted(per_value.items()):
        scales = sorted(by_scale, key=float)
        for axis, metric in zip(axes[0], METRICS):
            points = [(float(g), by_scale[g][metric]) for g in scales if by_scale[g].get(metric) is not None]
            if points:
                axis.plot(*zip(*points), marker="o", label=run)
    for axis, (metric, title) in zip(axes[0], METRICS.items()):
        _say_when_empty(axis, metric)
        axis.set_xlabel(factor)
        axis.set_title(title, fontsize=10)
        axis.grid(alpha=0.3)
    _legend(axes[0][0])
    figure.tight_layout()
    return figure


def smoothed_loss(points: list[tuple[int, float]]) -> list[tuple[int, float]]:
    """(step, loss) smoothed by an exponential moving average (0.9), as every loss curve of lookalike's is drawn."""
    smoothed, value = [], None
    for step, loss in points:
        value = loss if value is None else 0.9 * value + 0.1 * loss
        smoothed.append((step, value))
    return smoothed


def loss_figure(curves: dict[str, list[tuple[int, float]]]):
    """Training loss of every run against the step, smoothed (smoothed_loss)."""
    figure, axis = plt.subplots(figsize=(7, 4))
    for run, points in sorted(curves.items()):
        smoothed = smoothed_loss(points)
        if smoothed:
            axis.plot(*zip(*smoothed), label=run, linewidth=1.2)
    axis.set_xlabel("step")
    axis.set_ylabel("training loss (smoothed)")
    axis.grid(alpha=0.3)
    _legend(axis)
    figure.tight_layout()
    return figure


def steps_figure(scores: dict[str, list[dict]], best: dict[str, int]):
    """Identity similarity and CLIP Score of each run's scored samples against the step, one line per run, its
    best step (by the report's rule) starred."""
    metrics = {"identity_similarity": "identity similarity", "clip_score": "CLIP Score"}
    figure, axes = plt.subplots(1, len(metrics), figsize=(5.2 * len(metrics), 3.8), squeeze=False)
    for run, records in sorted(scores.items()):
        for axis, metric in zip(axes[0], metrics):
            points = [(r["step"], r[metric]) for r in records if r.get(metric) is not None]
            if not points:
                continue
            line, = axis.plot(*zip(*points), marker=".", label=run, linewidth=1.2)
            starred = [value for step, value in points if step == best.get(run)]
            if starred:
                axis.plot([best[run]], starred, marker="*", markersize=13, color=line.get_color())
    for axis, (metric, title) in zip(axes[0], metrics.items()):
        _say_when_empty(axis, metric)
        axis.set_xlabel("step")
        axis.set_title(f"{title} of the training samples", fontsize=10)
        axis.grid(alpha=0.3)
    _legend(axes[0][0] if axes[0][0].lines else axes[0][1])
    figure.tight_layout()
    return figure


def save(figure, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
