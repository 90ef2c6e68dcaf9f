"""Best settings by rule, not by eye: the runs no other run beats on every objective (the Pareto front),
ranked by a stated rule.

Objectives: identity similarity (higher is better), CLIP Score (higher) and face failures, i.e. images without
a face (lower). A run whose images show no face at all has no identity similarity; it counts as -1, the least
a cosine can be. A run missing a metric otherwise (not evaluated) cannot be placed and is left out, with the
reason. Runs with equal objectives do not dominate each other: ties share the front.
"""

from __future__ import annotations

NO_FACE = -1.0  # the identity similarity of a run without a single face
OBJECTIVES = {"identity_similarity": "max", "clip_score": "max", "faceless": "min"}
RANK_RULE = ("runs on the Pareto front of (identity similarity up, CLIP Score up, faceless images down), "
             "ranked by the mean of their ranks on the three objectives among the front's runs (ties share a "
             "rank); equal means are ordered by identity similarity")


def _objective(row: dict, key: str) -> float | None:
    """A run's value on one objective; identity of a run whose images show no face at all is NO_FACE (only for
    ranking: shown, it stays missing)."""
    if key == "identity_similarity" and row.get(key) is None and row.get("faceless") \
            and row.get("faceless") == row.get("images"):
        return NO_FACE
    return row.get(key)


def _oriented(row: dict) -> tuple[float, ...]:
    """The objectives with every one turned into 'higher is better'."""
    return tuple(_objective(row, k) if sense == "max" else -_objective(row, k) for k, sense in OBJECTIVES.items())


def dominates(a: dict, b: dict) -> bool:
    """a is at least as good as b on every objective and better on one."""
    x, y = _oriented(a), _oriented(b)
    return all(p >= q for p, q in zip(x, y)) and any(p > q for p, q in zip(x, y))


def pareto_front(rows: list[dict]) -> tuple[list[dict], dict[str, str]]:
    """(the front's rows, ranked best first; {run name: why it was left out} for runs that cannot be placed)."""
    unplaced = {r["name"]: "missing " + ", ".join(k for k in OBJECTIVES if _objective(r, k) is None)
                for r in rows if any(_objective(r, k) is None for k in OBJECTIVES)}
    placed = [r for r in rows if r["name"] not in unplaced]
    front = [r for r in placed if not any(dominates(other, r) for other in placed)]
    return rank(front), unplaced


def _ranks(values: list[float]) -> list[float]:
    """Rank 1 for the best (highest); ties get the mean of the ranks they span."""
    order = sorted(values, reverse=True)
    return [order.index(v) + (order.count(v) + 1) / 2 for v in values]


def rank(front: list[dict]) -> list[dict]:
    if not front:
        return []
    columns = list(zip(*(_oriented(r) for r in front)))
    per_objective = [_ranks(list(column)) for column in columns]
    mean_rank = [sum(ranks[i] for ranks in per_objective) / len(per_objective) for i in range(len(front))]
    order = sorted(range(len(front)), key=lambda i: (mean_rank[i], -_objective(front[i], "identity_similarity")))
    return [{**front[i], "mean_rank": mean_rank[i]} for i in order]


def front_steps(records: list[dict]) -> list[int]:
    """The training steps whose scored samples are on the Pareto front, best first (records of
    sample_scores.jsonl; steps missing a metric are left out)."""
    front, _ = pareto_front([{**record, "name": record["step"]} for record in records])
    return [row["name"] for row in front]
