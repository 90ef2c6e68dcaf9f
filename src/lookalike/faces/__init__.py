"""Face detection and identity embeddings behind one small interface, used by prepare, evaluate and the demo.

A backend finds faces in an RGB image and embeds faces in batches; `load_backend(name)` gives `facenet`
(MTCNN + InceptionResnetV1 with VGGFace2 weights, the study's) or `dlib` (HOG detector + 128-d ResNet,
offline). `FaceRule` says which detections count as faces, the same way everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import numpy as np

from lookalike.errors import LookalikeError


@dataclass(frozen=True)
class Face:
    box: tuple[float, float, float, float]  # left, top, right, bottom in the image's pixels
    score: float  # the detector's confidence (MTCNN: a probability; dlib: the HOG margin)

    @property
    def area(self) -> float:
        left, top, right, bottom = self.box
        return max(0.0, right - left) * max(0.0, bottom - top)

    @property
    def side(self) -> float:
        """The shorter side of the box, in pixels."""
        left, top, right, bottom = self.box
        return max(0.0, min(right - left, bottom - top))


class FaceBackend(Protocol):
    name: str
    version: str
    same_person_threshold: float  # L2 distance between embeddings under which two faces are one person
    default_min_score: float  # detections below this are not counted as faces
    thread_safe: bool  # whether two threads may call find_faces at once

    def find_faces(self, image, min_size: float = 0.0) -> list[Face]:
        """Every face in a PIL RGB image, most confident first; faces narrower than min_size pixels may be
        skipped (a detector can then search fewer scales)."""

    def embed(self, faces: Sequence[tuple[object, Face]]) -> np.ndarray:
        """Identity embeddings (one row per face) of (PIL image, face) pairs, computed in batches."""


@dataclass(frozen=True)
class FaceRule:
    """Which detections count as faces: confident enough, and not a speck in the background."""

    min_score: float
    min_size: float  # fraction of the image's shorter side

    @classmethod
    def for_backend(cls, backend: FaceBackend, min_score: float | None = None, min_size: float = 0.05) -> FaceRule:
        return cls(backend.default_min_score if min_score is None else min_score, min_size)

    def faces(self, backend: FaceBackend, image) -> list[Face]:
        min_pixels = self.min_size * min(image.size)
        return [f for f in backend.find_faces(image, min_pixels) if f.score >= self.min_score and f.side >= min_pixels]


def largest(faces: Sequence[Face]) -> Face:
    """The face a portrait is about: the largest one."""
    return max(faces, key=lambda f: f.area)


# Each face backend: its module and class, and the package that brings its models (its version is part of
# what prepare's cached findings depend on).
BACKENDS = {"dlib": ("lookalike.faces.dlib_backend", "DlibBackend", "dlib-bin"),
            "facenet": ("lookalike.faces.facenet_backend", "FacenetBackend", "facenet-pytorch")}


def backend_class(name: str) -> type:
    """The class of a face backend, imported without loading its models."""
    import importlib

    if name not in BACKENDS:
        raise LookalikeError(f"unknown face backend {name!r} (use {' or '.join(BACKENDS)})")
    module, cls, _ = BACKENDS[name]
    return getattr(importlib.import_module(module), cls)


def load_backend(name: str, **options) -> FaceBackend:
    return backend_class(name)(**options)
