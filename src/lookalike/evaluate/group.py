"""Photos of several people: every face is assigned to at most one person, and each person to at most one face,
by the assignment that minimises the total distance to the people's mean reference embeddings (the Hungarian
algorithm, scipy's linear_sum_assignment). A person counts as found when the face assigned to them lies within
the backend's same-person threshold.

Leakage: in an image whose prompt names one person only, how close the face comes to each person the prompt
does not name (a LoRA of two people that leaks gives A's prompt B's features).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from lookalike.evaluate.identity import Reference, face_distance, identity_similarity


@dataclass
class PersonScore:
    person: str
    face: int | None  # index of the face assigned to this person
    face_distance: float | None = None
    identity_similarity: float | None = None
    found: bool = False


def assign_faces(embeddings: np.ndarray, people: dict[str, Reference], threshold: float) -> list[PersonScore]:
    """One PersonScore per person, in the order of `people`."""
    from scipy.optimize import linear_sum_assignment

    names = list(people)
    scores = {name: PersonScore(name, None) for name in names}
    if len(embeddings):
        cost = np.array([[face_distance(e, people[n]) for n in names] for e in embeddings])
        for face, person in zip(*linear_sum_assignment(cost)):
            name = names[person]
            scores[name] = PersonScore(name, int(face), float(cost[face, person]),
                                       identity_similarity(embeddings[face], people[name]),
                                       bool(cost[face, person] < threshold))
    return [scores[n] for n in names]


def leakage(embedding: np.ndarray, people: dict[str, Reference], named: set[str]) -> dict[str, float]:
    """Identity similarity of an image's face to each person its prompt does not name."""
    return {name: identity_similarity(embedding, reference) for name, reference in people.items()
            if name not in named}


def group_row(inspection, prompt: str | None, people: dict[str, Reference], threshold: float) -> dict:
    """An image's row (an evaluator's Inspection with every face embedded): faces found, then per person the
    assigned face's distance, similarity and whether the person was found; and, for a prompt naming one of
    the people, the leakage towards each other person."""
    row: dict = {"image": inspection.path.name, "prompt": prompt}
    if inspection.error is not None:
        return {**row, "error": inspection.error}
    faces = [face for face, _ in inspection.embedded]
    embeddings = np.array([vector for _, vector in inspection.embedded])
    row["n_faces"] = len(faces)
    scores = assign_faces(embeddings, people, threshold)
    row["people_found"] = sum(s.found for s in scores)
    for s in scores:
        row.update({f"{s.person}_face_distance": s.face_distance,
                    f"{s.person}_identity_similarity": s.identity_similarity, f"{s.person}_found": s.found})
    named = {name for name in people if prompt and re.search(rf"\b{re.escape(name)}\b", prompt)}
    if faces and len(named) == 1:
        (person,) = named
        subject = next(s for s in scores if s.person == person)
        face = subject.face if subject.face is not None else faces.index(max(faces, key=lambda f: f.area))
        for other, similarity in leakage(embeddings[face], people, named).items():
            row[f"leakage_to_{other}"] = similarity
    return row


def score_group_images(evaluator, paths, prompts: list[str | None], people: dict[str, Reference]) -> list[dict]:
    """group_row of each image, every face embedded in the evaluator's chunked pass."""
    prompt_of = dict(zip(paths, prompts))
    threshold = evaluator.backend.same_person_threshold
    return [group_row(item, prompt_of[item.path], people, threshold)
            for chunk in evaluator.inspect(paths, every_face=True) for item in chunk]


def aggregate_group(rows: list[dict], people: list[str]) -> dict:
    readable = [r for r in rows if "error" not in r]

    def mean(key, subset=readable):
        values = [r[key] for r in subset if r.get(key) is not None]
        return float(np.mean(values)) if values else None

    return {
        "images": len(rows), "unreadable": len(rows) - len(readable),
        "people_found_mean": mean("people_found"),
        "all_found_rate": (sum(r["people_found"] == len(people) for r in readable) / len(readable)) if readable
        else None,
        "per_person": {p: {"face_distance": mean(f"{p}_face_distance"),
                           "identity_similarity": mean(f"{p}_identity_similarity"),
                           "found_rate": mean(f"{p}_found"), "leakage_to": mean(f"leakage_to_{p}")}
                       for p in people},
    }
