"""Likeness of generated faces to a subject's reference photos, as pure functions of embeddings.

- face_distance: the study's Face Distance Score: the L2 distance from an image's face embedding to the MEAN
  of the reference embeddings (lower is better); a run's score is its mean over images with a face.
- identity_similarity: cosine similarity to the normalised mean reference embedding (higher is better). With
  unit embeddings, different people already sit 0.8-1.4 apart in L2, so this and id_match are the stricter
  reading.
- id_match: whether the face lies within the backend's same-person L2 threshold of the mean reference.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Reference:
    mean: np.ndarray  # mean of the reference embeddings, as the study computes it
    count: int

    @property
    def direction(self) -> np.ndarray:
        return self.mean / np.linalg.norm(self.mean)


def reference_from(embeddings: list[np.ndarray]) -> Reference:
    if not embeddings:
        raise ValueError("no reference embeddings")
    return Reference(np.mean(np.stack(embeddings), axis=0), len(embeddings))


def face_distance(embedding: np.ndarray, reference: Reference) -> float:
    return float(np.linalg.norm(embedding - reference.mean))


def identity_similarity(embedding: np.ndarray, reference: Reference) -> float:
    return float(embedding @ reference.direction / np.linalg.norm(embedding))


def id_match(embedding: np.ndarray, reference: Reference, threshold: float) -> bool:
    return face_distance(embedding, reference) < threshold
