"""Face detection and identity embeddings behind one small interface, used by prepare, evaluate and the demo.

A backend finds faces in an RGB image and embeds one of them; `load_backend(name)` gives `facenet` (MTCNN +
InceptionResnetV1 with VGGFace2 weights, the study's) or `dlib` (HOG detector + 128-d ResNet, offline).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np


@dataclass(frozen=True)
class Face:
    box: tuple[float, float, float, float]  # left, top, right, bottom in the image's pixels
    score: float  # the detector's confidence (MTCNN: a probability; dlib: the HOG margin)

    @property
    def area(self) -> float:
        left, top, right, bottom = self.box
        return max(0.0, right - left) * max(0.0, bottom - top)


class FaceBackend(Protocol):
    name: str
    version: str
    same_person_threshold: float  # L2 distance between embeddings under which two faces are one person
    default_min_score: float  # detections below this are not counted as faces

    def find_faces(self, image) -> list[Face]:
        """Every face in a PIL RGB image, most confident first."""

    def embed(self, image, face: Face) -> np.ndarray:
        """The identity embedding of one face of the image."""


def load_backend(name: str, **options) -> FaceBackend:
    if name == "dlib":
        from lookalike.faces.dlib_backend import DlibBackend

        return DlibBackend(**options)
    if name == "facenet":
        from lookalike.faces.facenet_backend import FacenetBackend

        return FacenetBackend(**options)
    from lookalike.errors import LookalikeError

    raise LookalikeError(f"unknown face backend {name!r} (use facenet or dlib)")
