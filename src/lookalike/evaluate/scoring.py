"""Score a folder of generated images against reference photos: likeness, face failures and CLIP Score.

Models are loaded once per call; CLIP embeds images and prompts in batches. A file that cannot be read gets
a row with its reason instead of stopping the evaluation.
"""

from __future__ import annotations

import csv
import io
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path

from lookalike.data.images import list_images, load_rgb
from lookalike.errors import LookalikeError
from lookalike.evaluate.identity import Reference, face_distance, id_match, identity_similarity, reference_from
from lookalike.workspace import atomic_path, write_json


@dataclass
class ImageScore:
    image: str
    prompt: str | None
    face_found: bool = False
    n_faces: int = 0
    face_score: float | None = None
    face_distance: float | None = None
    identity_similarity: float | None = None
    id_match: bool | None = None
    clip_score: float | None = None
    error: str | None = None


def prompts_for(images: list[Path], prompts_file: Path | None) -> list[str | None]:
    """Each image's prompt: its JSON sidecar's, else the prompts file's (one line for all, or one per image
    in name order), else none (no CLIP Score)."""
    import json

    lines = []
    if prompts_file is not None:
        if not Path(prompts_file).is_file():
            raise LookalikeError(f"--prompts: file not found: {prompts_file}")
        lines = [line.strip() for line in Path(prompts_file).read_text().splitlines() if line.strip()]
        if len(lines) not in (1, len(images)):
            raise LookalikeError(f"{prompts_file}: {len(lines)} prompts for {len(images)} images "
                                 "(give one prompt for all, or one per image in name order)")
    prompts = []
    for index, image in enumerate(images):
        sidecar = image.with_suffix(".json")
        if sidecar.is_file():
            prompts.append(json.loads(sidecar.read_text())["prompt"])
        elif lines:
            prompts.append(lines[0] if len(lines) == 1 else lines[index])
        else:
            prompts.append(None)
    return prompts


def _faces(backend, image, min_score: float):
    return [f for f in backend.find_faces(image) if f.score >= min_score]


def build_reference(backend, folder: Path, min_score: float) -> Reference:
    """Mean embedding of the largest face of every reference photo that has one."""
    embeddings = []
    for path in list_images(folder, "references"):
        try:
            image = load_rgb(path)
        except OSError:
            continue
        faces = _faces(backend, image, min_score)
        if faces:
            embeddings.append(backend.embed(image, max(faces, key=lambda f: f.area)))
    if not embeddings:
        raise LookalikeError(f"references: no face found in any photo of {folder}")
    return reference_from(embeddings)


def score_images(paths: list[Path], prompts: list[str | None], backend, reference: Reference, clip_scorer=None,
                 min_score: float | None = None) -> list[ImageScore]:
    min_score = backend.default_min_score if min_score is None else min_score
    rows, loaded = [], []
    for path, prompt in zip(paths, prompts):
        row = ImageScore(image=path.name, prompt=prompt)
        rows.append(row)
        try:
            image = load_rgb(path)
        except OSError as error:
            row.error = f"unreadable image: {error}"
            continue
        faces = _faces(backend, image, min_score)
        row.n_faces, row.face_found = len(faces), bool(faces)
        if faces:
            face = max(faces, key=lambda f: f.area)
            embedding = backend.embed(image, face)
            row.face_score = face.score
            row.face_distance = face_distance(embedding, reference)
            row.identity_similarity = identity_similarity(embedding, reference)
            row.id_match = id_match(embedding, reference, backend.same_person_threshold)
        if prompt is not None:
            loaded.append((row, image))
    if clip_scorer is not None and loaded:
        scores = clip_scorer.paired([image for _, image in loaded], [row.prompt for row, _ in loaded])
        for (row, _), score in zip(loaded, scores):
            row.clip_score = score
    return rows


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.mean(values) if values else None


def aggregate(rows: list[ImageScore]) -> dict:
    readable = [r for r in rows if r.error is None]
    with_face = [r for r in readable if r.face_found]
    clip = _mean(r.clip_score for r in readable)
    return {
        "images": len(rows),
        "unreadable": len(rows) - len(readable),
        "face_distance": _mean(r.face_distance for r in with_face),
        "identity_similarity": _mean(r.identity_similarity for r in with_face),
        "id_match_rate": (sum(bool(r.id_match) for r in with_face) / len(readable)) if readable else None,
        "faceless": sum(not r.face_found for r in readable),
        "several_faces": sum(r.n_faces > 1 for r in readable),
        "clip_score": clip,
        "clip_score_x100": clip * 100 if clip is not None else None,
    }


def write_results(folder: Path, rows: list[ImageScore], metrics: dict) -> None:
    """scores.csv (one row per image) and metrics.json (aggregates), each written atomically."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(asdict(rows[0]).keys()))
    writer.writeheader()
    writer.writerows(asdict(row) for row in rows)
    with atomic_path(folder / "scores.csv") as tmp:
        tmp.write_text(buffer.getvalue())
    write_json(folder / "metrics.json", metrics)
