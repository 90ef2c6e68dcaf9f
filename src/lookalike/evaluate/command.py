"""lookalike evaluate: likeness (face distance, identity similarity, id-match rate), face failures and CLIP
Score of generated images, for the runs of a study or for plain folders.

The models load once per process: every run of a study is scored by the same Evaluator, against reference
embeddings computed once from each person's photos (the ones prepare kept, when it has run).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from rich.console import Console
from rich.table import Table

from lookalike.config import EvaluateConfig, StudyConfig, SubjectConfig
from lookalike.data.checks import duplicates, perceptual_hash
from lookalike.data.images import list_images, load_rgb
from lookalike.display import cell
from lookalike.errors import LookalikeError
from lookalike.evaluate.scoring import SCORING_VERSION, aggregate, aggregate_by, describe_images, write_results
from lookalike.models.base import quiet_libraries
from lookalike.models.clip import load_clip
from lookalike.progress import progress_bar
from lookalike.store import record_run
from lookalike.workspace import Workspace, atomic_path, checked_checkpoint, file_sha256, read_json, write_json

SHOWN = ("face_distance", "identity_similarity", "id_match_rate", "bleed_similarity", "faceless", "several_faces",
         "clip_score")


_LOADED: dict[tuple[str, bool], object] = {}


def load_evaluator(settings: EvaluateConfig, with_clip: bool, on_cpu: bool = False):
    """The Evaluator for these settings, loaded once per process: `lookalike run` scores its runs one call at a
    time, and ablate scores after it, all with the same models. on_cpu: its models stay off the accelerator
    (scoring while training, which needs that memory)."""
    key = (settings.model_dump_json(), with_clip, on_cpu)
    if key not in _LOADED:
        _LOADED[key] = _load_evaluator(settings, with_clip, on_cpu)
    return _LOADED[key]


def _load_evaluator(settings: EvaluateConfig, with_clip: bool, on_cpu: bool):
    import torch

    from lookalike.evaluate.clip_score import ClipScorer
    from lookalike.evaluate.evaluator import Evaluator
    from lookalike.faces import FaceRule, load_backend

    quiet_libraries()
    placed = on_cpu and settings.face_backend == "facenet"  # dlib runs on the CPU anyway
    backend = load_backend(settings.face_backend, **({"device": "cpu"} if placed else {}))
    rule = FaceRule.for_backend(backend, settings.min_face_score, settings.min_face_size)
    device = torch.device("cpu") if on_cpu else None
    return Evaluator(backend, rule, ClipScorer(*load_clip(settings.clip_model), device=device) if with_clip else None)


def score_named(evaluator, references: dict[str, object], paths: list[Path], rows, all_pairs: bool, progress=None,
                on_faces=None) -> None:
    """Fill in `rows` (one per path): each image scored against the person its prompt names first (the first
    person of `references`, token -> Reference, when it names none)."""
    tokens = list(references)
    groups: dict[str, list[int]] = {}
    for index, row in enumerate(rows):
        named = next((t for t in tokens if row.prompt and re.search(rf"\b{re.escape(t)}\b", row.prompt)), None)
        if all(tokens) and row.prompt is not None:  # the study's people: a prompt naming none of them measures bleed
            row.names_person = named is not None
        groups.setdefault(named or tokens[0], []).append(index)
    for token, members in groups.items():
        evaluator.score([paths[i] for i in members], [rows[i] for i in members], references[token],
                        all_pairs=all_pairs, progress=progress, on_faces=on_faces)


def _score_folder(evaluator, references: dict[str, object], images: Path, rows, settings: EvaluateConfig,
                  console: Console, class_words: dict[str, str] | None = None, on_faces=None):
    """Score a folder's images (`rows` from describe_images, one per image in list_images order) against the
    references (token -> Reference; one entry when the prompts name nobody). An image is scored against the
    person its prompt names first (the first person when it names none). on_faces: see Evaluator.score."""
    paths = [images / row.image for row in rows]
    with progress_bar(console, f"evaluate {images.name}", total=len(paths)) as bar:
        score_named(evaluator, references, paths, rows, settings.all_pairs, progress=bar, on_faces=on_faces)
    backend = evaluator.backend
    replaced = ", ".join(f"{token!r} by {word!r}" for token, word in (class_words or {}).items())
    metrics = {
        **aggregate(rows),
        "per_prompt": aggregate_by(rows, "prompt"),
        "per_guidance_scale": aggregate_by(rows, "guidance_scale"),
        "per_lora_scale": aggregate_by(rows, "lora_scale"),
        "face_backend": backend.name, "face_backend_version": backend.version,
        "same_person_threshold": backend.same_person_threshold,
        "min_face_score": evaluator.rule.min_score, "min_face_size": evaluator.rule.min_size,
        "references": sum(reference.count for reference in references.values()),
        "clip_model": settings.clip_model if evaluator.clip else None,
        "clip_pairs": "all prompts x all images" if settings.all_pairs else "each image with its own prompt",
        "clip_prompts": f"trigger words replaced: {replaced}" if replaced else "as given",
    }
    return rows, metrics


def print_metrics(console: Console, title: str, metrics: dict) -> None:
    """The whole set's figures, then each prompt's."""
    table = Table("prompt", "images", *SHOWN, title=title)
    for label, m in [("all", metrics), *metrics.get("per_prompt", {}).items()]:
        table.add_row(label, str(m["images"]), *(cell(m[k]) for k in SHOWN))
    console.print(table)


def evaluate_folder(images: Path, references: Path, settings: EvaluateConfig, console: Console,
                    prompts_file: Path | None = None, out: Path | None = None) -> dict:
    """Score a folder of images against a folder of reference photos; write scores.csv and metrics.json."""
    rows = describe_images(list_images(images, "images"), prompts_file)
    evaluator = load_evaluator(settings, with_clip=any(r.prompt for r in rows))
    reference = evaluator.reference(list_images(references, "references"))
    rows, metrics = _score_folder(evaluator, {"": reference}, images, rows, settings, console)
    write_results(out or images, rows, metrics)
    print_metrics(console, f"evaluate {images}", metrics)
    return metrics


def evaluate_group_folder(images: Path, people: dict[str, Path], settings: EvaluateConfig, console: Console,
                          prompts_file: Path | None = None, out: Path | None = None) -> dict:
    """Score images of several people: each face assigned to a person, each person's likeness, how many of
    them were found, and leakage (an image whose prompt names one person, compared with the others).
    Writes group_scores.csv and group_metrics.json."""
    from lookalike.evaluate.group import score_group_images

    paths = list_images(images, "images")
    prompts = [row.prompt for row in describe_images(paths, prompts_file)]
    evaluator = load_evaluator(settings, with_clip=False)
    references = {name: evaluator.reference(list_images(folder, f"--person {name}")) for name, folder in people.items()}
    rows = score_group_images(evaluator, paths, prompts, references)
    metrics = _group_metrics(evaluator, rows, list(people))
    _write_group(out or images, rows, metrics)
    _print_group(console, f"group {images}", metrics)
    return metrics


def _group_metrics(evaluator, rows: list[dict], people: list[str]) -> dict:
    from lookalike.evaluate.group import aggregate_group

    backend = evaluator.backend
    return {**aggregate_group(rows, people), "face_backend": backend.name, "face_backend_version": backend.version,
            "same_person_threshold": backend.same_person_threshold}


def _write_group(folder: Path, rows: list[dict], metrics: dict) -> None:
    import csv
    import io

    columns = list(dict.fromkeys(key for row in rows for key in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    with atomic_path(folder / "group_scores.csv") as tmp:
        tmp.write_text(buffer.getvalue())
    write_json(folder / "group_metrics.json", metrics)


def _print_group(console: Console, title: str, metrics: dict) -> None:
    table = Table("person", "face distance", "identity", "found rate", "leakage to them", title=title)
    for name, m in metrics["per_person"].items():
        table.add_row(name, *(cell(m[k]) for k in ("face_distance", "identity_similarity", "found_rate", "leakage_to")))
    console.print(table)
    console.print(f"all people found in {metrics['all_found_rate']} of the images", highlight=False)


def reference_photos(config: StudyConfig, subject: SubjectConfig | None = None) -> list[Path]:
    """The photos a person's likeness is measured against: their held-out photos ([subject] references) where
    given; else the photos prepare kept for training (outliers and duplicates out), at their full size, which suits
    face embeddings better than the training crops, and all of them before prepare has run."""
    from lookalike.data.prepare import data_folder

    subject = subject or config.subject
    manifest = data_folder(config, subject) / "manifest.json"
    if subject.references is not None:
        return held_out_photos(config, subject, manifest)
    if manifest.is_file():
        kept = [Path(p["source"]) for p in read_json(manifest)["photos"] if p["status"] == "kept"]
        if kept:
            return kept
    return list_images(subject.images)


def held_out_photos(config: StudyConfig, subject: SubjectConfig, manifest: Path) -> list[Path]:
    """[subject] references, refused where one is a training photo or a near copy of one (perceptual hashes
    within [data] near_duplicate_bits, as prepare finds duplicates): held out means never trained on."""
    references = list_images(subject.references, "subject.references")
    if manifest.is_file():
        trained = [(p["source"], p["sha256"], int(p["phash"], 16)) for p in read_json(manifest)["photos"]
                   if p.get("sha256") and p.get("phash")]
    else:
        trained = [(str(path), *_photo_hashes(path)) for path in list_images(subject.images)]
    photos = trained + [(str(path), *_photo_hashes(path)) for path in references]
    copies = duplicates([sha for _, sha, _ in photos], [phash for _, _, phash in photos],
                        config.data.near_duplicate_bits)
    for index, (kind, earlier, _) in sorted(copies.items()):
        if index >= len(trained) > earlier:
            what = "the training photo" if kind == "exact" else "a near copy of the training photo"
            raise LookalikeError(f"subject.references: {photos[index][0]} is {what} {photos[earlier][0]}: held-out "
                                 "references are photos the LoRA never trained on")
    return references


def _photo_hashes(path: Path) -> tuple[str, int]:
    """(SHA-256, 64-bit perceptual hash) of a photo, as prepare records them."""
    return file_sha256(path), int(perceptual_hash(load_rgb(path)), 16)


def _inputs_digest(config: StudyConfig, images: Path, references: list[Path], lora_sha256: str) -> str:
    """What the metrics of a run depend on: the LoRA file, its images and sidecars, the references, the settings
    and how lookalike scores (SCORING_VERSION)."""
    files = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in [*sorted(images.iterdir()), *references]
             if p.is_file() and not p.name.startswith(".") and p.name not in ("metrics.json", "scores.csv")]
    facts = [lora_sha256, files, config.evaluate.model_dump(mode="json"),
             [p.model_dump(mode="json") for p in config.people], SCORING_VERSION]
    return hashlib.sha256(json.dumps(facts, default=str).encode()).hexdigest()


def evaluate_runs(config: StudyConfig, console: Console, run: str | None = None, force: bool = False,
                  checkpoint: str = "final") -> list[str]:
    """Score the generated images of one run, or of every run that has some; runs whose images, references
    and settings have not changed since their last evaluation are skipped. Returns the runs scored. A run's
    images of another checkpoint than the final (images-<checkpoint>/, from generate --checkpoint) get their
    metrics.json and scores.csv in that folder; the results table holds the final LoRA's."""
    from lookalike.evaluate.group import group_row

    workspace = Workspace(config.workspace)
    checkpoint = checked_checkpoint(checkpoint)
    if checkpoint != "final" and run is None:
        raise LookalikeError("--checkpoint picks one of a run's LoRAs: give --run NAME")
    if run is not None:
        if not workspace.run(run).images_at(checkpoint).is_dir():
            raise LookalikeError(f"run {run!r} has no generated images yet ({workspace.run(run).images_at(checkpoint)}"
                                 f"); run: lookalike generate CONFIG --run {run}"
                                 + (f" --checkpoint {checkpoint}" if checkpoint != "final" else ""))
        names = [run]
    else:
        names = sorted(p.name for p in workspace.runs.glob("*") if (p / "images").is_dir())
    photos = {person.token: reference_photos(config, person) for person in config.people}
    todo = []
    for name in names:
        paths = workspace.run(name)
        lora = paths.lora_sha256(checkpoint)
        foreign = paths.images_made_by(checkpoint, lora)[1]
        if foreign:  # never scores, or calls up to date, images under a LoRA that did not draw them
            problem = (f"run {name!r}: {len(foreign)} images in {paths.images_at(checkpoint)} were drawn by another "
                       f"LoRA than its {checkpoint} one now; draw them again first: lookalike generate CONFIG --run "
                       f"{name}" + (f" --checkpoint {checkpoint}" if checkpoint != "final" else ""))
            if run is not None:
                raise LookalikeError(problem)
            console.print(f"evaluate: skipped {problem}", highlight=False)
            continue
        digest = _inputs_digest(config, paths.images_at(checkpoint), [p for group in photos.values() for p in group],
                                lora)
        done = paths.results_at(checkpoint) / "metrics.json"
        if not force and done.is_file() and read_json(done).get("inputs_digest") == digest:
            console.print(f"evaluate: {name} is up to date")
            continue
        todo.append((name, digest, lora))
    if not todo:
        return []

    evaluator = load_evaluator(config.evaluate, with_clip=True)
    references = {token: evaluator.reference(group) for token, group in photos.items()}
    class_words = {person.token: person.class_word for person in config.people}
    held_out = {person.token: "held-out " if person.references is not None else "" for person in config.people}
    console.print("evaluate: references: " + ", ".join(f"{r.count} {held_out[t]}photos of {t}"
                                                      for t, r in references.items())
                  + "; CLIP prompts have " + ", ".join(f"{t!r} replaced by {w!r}" for t, w in class_words.items()))
    threshold = evaluator.backend.same_person_threshold
    for name, digest, lora in todo:
        paths = workspace.run(name)
        group_rows: list[dict] = []  # several people: who is in each image, and whose face leaks into whose prompt

        def score_people(row, inspection):
            group_rows.append(group_row(inspection, row.prompt, references, threshold))

        images = paths.images_at(checkpoint)
        rows = describe_images(list_images(images, "images"), class_words=class_words)
        rows, metrics = _score_folder(evaluator, references, images, rows, config.evaluate, console,
                                      class_words=class_words, on_faces=score_people if len(references) > 1 else None)
        metrics["inputs_digest"] = digest
        metrics["lora_sha256"] = lora  # what card and report check: these figures are of that file
        metrics["references_held_out"] = config.subject.references is not None
        if group_rows:
            order = {row.image: index for index, row in enumerate(rows)}  # rows were scored person by person
            group_rows.sort(key=lambda group: order[group["image"]])
            group = _group_metrics(evaluator, group_rows, list(references))
            _write_group(paths.results_at(checkpoint), group_rows, group)
            _print_group(console, f"evaluate run {name}: people", group)
        write_results(paths.results_at(checkpoint), rows, metrics)
        if checkpoint == "final":
            record_run(workspace.results, paths)
        print_metrics(console, f"evaluate run {name}" + (f" ({checkpoint})" if checkpoint != "final" else ""),
                      metrics)
    return [name for name, _, _ in todo]
