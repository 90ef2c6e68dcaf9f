"""Pareto selection of the best runs on hand-made metric tables."""

from lookalike.evaluate.pareto import dominates, pareto_front


def run(name, identity, clip, faceless):
    return {"name": name, "identity_similarity": identity, "clip_score": clip, "faceless": faceless}


def names(rows):
    return [r["name"] for r in rows]


def test_dominated_runs_are_left_off_and_the_front_is_ranked():
    rows = [run("best_identity", 0.9, 0.25, 1), run("best_clip", 0.6, 0.32, 1), run("balanced", 0.8, 0.30, 0),
            run("worse_than_balanced", 0.7, 0.29, 2), run("worst", 0.5, 0.2, 5)]
    front, unplaced = pareto_front(rows)
    assert set(names(front)) == {"best_identity", "best_clip", "balanced"} and unplaced == {}
    assert names(front)[0] == "balanced", "second on identity and CLIP, first on face failures: mean rank 5/3"


def test_ties_share_the_front():
    rows = [run("a", 0.8, 0.3, 0), run("b", 0.8, 0.3, 0), run("c", 0.7, 0.3, 0)]
    front, _ = pareto_front(rows)
    assert sorted(names(front)) == ["a", "b"]
    assert front[0]["mean_rank"] == front[1]["mean_rank"]
    assert not dominates(rows[0], rows[1]) and not dominates(rows[1], rows[0])


def test_runs_missing_a_metric_are_left_out_with_the_reason():
    rows = [run("ok", 0.8, 0.3, 0), run("clip_failed", 0.8, None, 0), {"name": "not_evaluated"}]
    front, unplaced = pareto_front(rows)
    assert names(front) == ["ok"]
    assert unplaced == {"clip_failed": "missing clip_score",
                        "not_evaluated": "missing identity_similarity, clip_score, faceless"}


def test_a_run_without_any_face_counts_as_the_least_identity():
    rows = [{**run("no_faces", None, 0.35, 12), "images": 12}, {**run("faces", 0.5, 0.30, 2), "images": 12}]
    front, unplaced = pareto_front(rows)
    assert unplaced == {} and names(front) == ["faces", "no_faces"], "better CLIP keeps it on the front"
    assert front[1]["identity_similarity"] is None, "ranked as -1, shown as missing, like everywhere else"


def test_no_evaluated_run_gives_an_empty_front():
    assert pareto_front([{"name": "x"}]) == ([], {"x": "missing identity_similarity, clip_score, faceless"})
