"""The scoring engine: face backend, face rule and CLIP loaded once, images streamed through in chunks.

Per chunk, two worker threads decode images and search them for faces (decoding and MTCNN's numpy steps
overlap that way), the largest face of every image (or every face, for photos of several people) is embedded
in one batch, and CLIP embeds the chunk's images in one batch against prompt embeddings computed once.
Memory stays at one chunk of images however many are scored. A file that cannot be read gets a row with its
reason instead of stopping the evaluation.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lookalike.data.images import load_rgb
from lookalike.errors import LookalikeError
from lookalike.evaluate.identity import Reference, face_distance, id_match, identity_similarity, reference_from
from lookalike.evaluate.scoring import ImageScore
from lookalike.faces import Face, FaceBackend, FaceRule, largest

CHUNK = 16  # images in memory at once; also the batch of face embeddings and of CLIP images
WORKERS = 2


@dataclass
class Inspection:
    path: Path
    image: object | None  # the decoded image; None when unreadable
    faces: list[Face]  # every face the rule keeps
    embedded: list[tuple[Face, np.ndarray]]  # the faces embedded (the largest, or all) with their embeddings
    error: str | None


class Evaluator:
    def __init__(self, backend: FaceBackend, rule: FaceRule, clip_scorer=None):
        self.backend, self.rule, self.clip = backend, rule, clip_scorer
        # dlib's detector corrupts memory when two threads share it; MTCNN (torch modules) does not.
        self._detecting = nullcontext() if backend.thread_safe else threading.Lock()

    def _inspect(self, path: Path):
        """(image, faces, error) of one file."""
        try:
            image = load_rgb(path)
        except OSError as error:
            return None, [], f"unreadable image: {error}"
        with self._detecting:
            return image, self.rule.faces(self.backend, image), None

    def _chunks(self, paths: list[Path]):
        """(paths, inspections) per chunk; while the caller embeds one chunk, the pool inspects the next."""
        chunks = [paths[start:start + CHUNK] for start in range(0, len(paths), CHUNK)]
        with ThreadPoolExecutor(WORKERS) as pool:
            pending = [pool.submit(self._inspect, path) for path in chunks[0]] if chunks else []
            for index, chunk in enumerate(chunks):
                inspected = [future.result() for future in pending]
                following = chunks[index + 1] if index + 1 < len(chunks) else []
                pending = [pool.submit(self._inspect, path) for path in following]
                yield chunk, inspected

    def inspect(self, paths: list[Path], every_face: bool = False):
        """Per chunk of paths, an Inspection of each image: its faces, and the embedding of its largest face,
        or of every face (photos of several people). Each chunk's faces are embedded in one batch."""
        for chunk, inspected in self._chunks(paths):
            chosen = [(faces if every_face else [largest(faces)]) if faces else [] for _, faces, _ in inspected]
            vectors = iter(self.backend.embed([(image, face) for (image, _, _), picked in zip(inspected, chosen)
                                               for face in picked]))
            yield [Inspection(path, image, faces, [(face, next(vectors)) for face in picked], error)
                   for path, (image, faces, error), picked in zip(chunk, inspected, chosen)]

    def reference(self, photos: list[Path]) -> Reference:
        """Mean embedding of the largest face of every reference photo that has one."""
        found = [item.embedded[0][1] for chunk in self.inspect(photos) for item in chunk if item.faces]
        if not found:
            folders = ", ".join(sorted({str(p.parent) for p in photos}))
            raise LookalikeError(f"references: no face found in any photo of {folders}")
        return reference_from(found)

    def score(self, paths: list[Path], rows: list[ImageScore], reference: Reference, all_pairs: bool = False,
              progress=None, on_faces=None) -> list[ImageScore]:
        """Fill in the face and CLIP columns of `rows` (one per path) from each image's largest face. all_pairs:
        each image's clip_score is its mean over every prompt of the set (the study's all prompts x all images
        average). on_faces(row, inspection): called per image with every face embedded, for scoring several
        people in the same pass."""
        by_path = dict(zip(paths, rows))
        prompts = list(dict.fromkeys(r.clip_prompt for r in rows if r.clip_prompt is not None))
        for chunk in self.inspect(paths, every_face=on_faces is not None):
            for item in chunk:
                row = by_path[item.path]
                row.error, row.n_faces, row.face_found = item.error, len(item.faces), bool(item.faces)
                if item.faces:
                    face = largest(item.faces)
                    embedding = next(vector for embedded, vector in item.embedded if embedded is face)
                    row.face_score, row.face_box = face.score, tuple(round(v) for v in face.box)
                    row.face_distance = face_distance(embedding, reference)
                    row.identity_similarity = identity_similarity(embedding, reference)
                    row.id_match = id_match(embedding, reference, self.backend.same_person_threshold)
                if on_faces is not None:
                    on_faces(row, item)
            self._clip(chunk, by_path, prompts if all_pairs else None)
            (progress or _NoProgress()).update(len(chunk))
        return rows

    def _clip(self, chunk: list[Inspection], by_path, all_prompts: list[str] | None) -> None:
        scored = [(by_path[item.path], item.image) for item in chunk
                  if item.image is not None and by_path[item.path].clip_prompt is not None]
        if self.clip is None or not scored:
            return
        images = [image for _, image in scored]
        if all_prompts is None:
            scores = self.clip.paired(images, [row.clip_prompt for row, _ in scored])
        else:
            scores = self.clip.all_pairs(images, all_prompts).mean(dim=1).tolist()
        for (row, _), score in zip(scored, scores):
            row.clip_score = score


class _NoProgress:
    def update(self, advance: int = 1) -> None:
        pass
