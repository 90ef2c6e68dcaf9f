"""Per-image scores and their aggregates: what evaluate writes to scores.csv and metrics.json.

An image's prompt comes from its JSON sidecar (written by generate) or from a prompts file. CLIP is given the
prompt with the trigger word replaced by the class word: CLIP has never seen the trigger word, so leaving it
in would only add noise to the score.
"""

from __future__ import annotations

import csv
import io
import json
import re
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path

from lookalike.errors import LookalikeError
from lookalike.workspace import atomic_path, write_json

# Bumped when what a metric means changes, so that runs scored before are scored again rather than kept under the
# new meaning (2: an image whose prompt names nobody counts as bleed, not likeness).
SCORING_VERSION = 2


@dataclass
class ImageScore:
    image: str
    prompt: str | None = None
    clip_prompt: str | None = None
    seed: int | None = None
    guidance_scale: float | None = None
    lora_scale: float | None = None
    face_found: bool = False
    n_faces: int = 0
    face_score: float | None = None
    face_box: tuple[int, int, int, int] | None = None  # left, top, right, bottom of the scored face
    face_distance: float | None = None
    identity_similarity: float | None = None
    id_match: bool | None = None
    clip_score: float | None = None
    error: str | None = None
    # Whether its prompt names one of the study's people (None: not known, as for a folder of images): an image
    # whose prompt names nobody ("a photo of a person") measures bleed, not likeness.
    names_person: bool | None = None


def clip_prompt(prompt: str, class_words: dict[str, str] | None) -> str:
    """The prompt with each trigger word (a key of class_words) replaced by its class word."""
    for token, class_word in (class_words or {}).items():
        prompt = re.sub(rf"\b{re.escape(token)}\b", class_word, prompt)
    return prompt


def describe_images(images: list[Path], prompts_file: Path | None = None,
                    class_words: dict[str, str] | None = None) -> list[ImageScore]:
    """A row per image with what is known before scoring: prompt (sidecar, else the prompts file: one line for
    all images or one per image in name order, else none and no CLIP Score), seed and guidance scale."""
    lines = []
    if prompts_file is not None:
        if not Path(prompts_file).is_file():
            raise LookalikeError(f"--prompts: file not found: {prompts_file}")
        try:
            text = Path(prompts_file).read_text()
        except UnicodeDecodeError:
            raise LookalikeError(f"--prompts: {prompts_file} is not a text file of prompts") from None
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        if len(lines) not in (1, len(images)):
            raise LookalikeError(f"{prompts_file}: {len(lines)} prompts for {len(images)} images "
                                 "(give one prompt for all, or one per image in name order)")
    rows = []
    for index, image in enumerate(images):
        row = ImageScore(image=image.name)
        sidecar = image.with_suffix(".json")
        if sidecar.is_file():
            try:
                facts = json.loads(sidecar.read_text())
                row.prompt, row.seed = facts["prompt"], facts.get("seed")
                row.guidance_scale, row.lora_scale = facts.get("guidance_scale"), facts.get("lora_scale")
            except (ValueError, KeyError) as error:
                raise LookalikeError(f"{sidecar}: not a generate sidecar ({error})") from None
        elif lines:
            row.prompt = lines[0] if len(lines) == 1 else lines[index]
        if row.prompt is not None:
            row.clip_prompt = clip_prompt(row.prompt, class_words)
        rows.append(row)
    return rows


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.mean(values) if values else None


def aggregate(rows: list[ImageScore]) -> dict:
    """The study's figures over a set of images. Likeness (face distance and similarity over images with a face,
    the id-match rate over all) counts the images whose prompt names a person (every image, where that is not
    known); bleed, the identity similarity of faces in images whose prompt names nobody (the subject's look leaking
    into anyone the LoRA draws: lower is better), the others. Face failures and CLIP Score count every readable
    image."""
    readable = [r for r in rows if r.error is None]
    likeness = [r for r in readable if r.names_person is not False]
    with_face = [r for r in likeness if r.face_found]
    clip = _mean(r.clip_score for r in readable)
    return {
        "images": len(rows),
        "unreadable": len(rows) - len(readable),
        "face_distance": _mean(r.face_distance for r in with_face),
        "identity_similarity": _mean(r.identity_similarity for r in with_face),
        "id_match_rate": (sum(bool(r.id_match) for r in with_face) / len(likeness)) if likeness else None,
        "bleed_similarity": _mean(r.identity_similarity for r in readable if r.names_person is False and r.face_found),
        "faceless": sum(not r.face_found for r in readable),
        "several_faces": sum(r.n_faces > 1 for r in readable),
        "clip_score": clip,
        "clip_score_x100": clip * 100 if clip is not None else None,
    }


def aggregate_by(rows: list[ImageScore], key: str) -> dict[str, dict]:
    """Aggregates per value of one column (prompt, guidance_scale), for images where it is known."""
    groups: dict[str, list[ImageScore]] = {}
    for row in rows:
        if getattr(row, key) is not None:
            groups.setdefault(str(getattr(row, key)), []).append(row)
    return {value: aggregate(group) for value, group in groups.items()}


def write_results(folder: Path, rows: list[ImageScore], metrics: dict) -> None:
    """scores.csv (one row per image) and metrics.json (aggregates), each written atomically."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(ImageScore.__dataclass_fields__))
    writer.writeheader()
    writer.writerows(asdict(row) for row in rows)
    with atomic_path(folder / "scores.csv") as tmp:
        tmp.write_text(buffer.getvalue())
    write_json(folder / "metrics.json", metrics)
