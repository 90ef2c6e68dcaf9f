"""dlib's HOG face detector and 128-d ResNet face embeddings (weights from face_recognition_models, offline).

face_recognition_models imports pkg_resources, which new setuptools lack, so its model files are located
with importlib instead of importing it.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Sequence

import numpy as np

from lookalike.errors import LookalikeError
from lookalike.faces import Face

MAX_SIDE = 1024  # HOG detection cost grows with pixels; faces worth scoring stay well detectable at this size


def _model_file(name: str) -> Path:
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise LookalikeError("the dlib face backend needs the package face_recognition_models (pip install it)")
    return Path(next(iter(spec.submodule_search_locations))) / "models" / name


class DlibBackend:
    name = "dlib"
    same_person_threshold = 0.6  # dlib's documented threshold for its 128-d embeddings
    thread_safe = False
    default_min_score = 0.0

    def __init__(self, upsample: int = 1):
        import dlib

        self.version = dlib.__version__
        self.upsample = upsample
        self.detector = dlib.get_frontal_face_detector()
        self.landmarks = dlib.shape_predictor(str(_model_file("shape_predictor_5_face_landmarks.dat")))
        self.encoder = dlib.face_recognition_model_v1(str(_model_file("dlib_face_recognition_resnet_model_v1.dat")))

    @staticmethod
    def _array(image) -> tuple[np.ndarray, float]:
        """The image as dlib reads it, shrunk to MAX_SIDE at most, and the scale applied."""
        scale = min(1.0, MAX_SIDE / max(image.size))
        small = image if scale == 1.0 else image.resize((round(image.width * scale), round(image.height * scale)))
        return np.ascontiguousarray(np.asarray(small.convert("RGB"))), scale

    def find_faces(self, image, min_size: float = 0.0) -> list[Face]:
        # HOG's search window is fixed (80 px, 40 px with one upsampling): min_size cannot save any work here.
        array, scale = self._array(image)
        rects, scores, _ = self.detector.run(array, self.upsample, -0.5)
        faces = [Face((r.left() / scale, r.top() / scale, r.right() / scale, r.bottom() / scale), float(s))
                 for r, s in zip(rects, scores)]
        return sorted(faces, key=lambda f: -f.score)

    def embed(self, faces: Sequence[tuple[object, Face]]) -> np.ndarray:
        import dlib

        rows = []
        for image, face in faces:
            array, scale = self._array(image)
            left, top, right, bottom = (round(v * scale) for v in face.box)
            shape = self.landmarks(array, dlib.rectangle(left, top, right, bottom))
            rows.append(np.asarray(self.encoder.compute_face_descriptor(array, shape), dtype=np.float32))
        return np.stack(rows) if rows else np.zeros((0, 128), dtype=np.float32)
