"""lookalike prepare: a subject's raw photos -> data/: square face crops at [data].resolution (or each photo's own
framing, [data] buckets), a caption per crop, manifest.json (every photo, what was found in it, each check's
result and reason) and qa.html.

It works in three passes:
1. inspect each photo on its own: read it, hash it, find its faces (MTCNN) and embed them (the evaluation's
   face backend). This is the slow part; its results are kept in manifest.json and reused for every photo
   whose bytes and inspection settings are unchanged, so models load only when a photo is new or changed;
2. decide across photos: which face is the subject's, duplicates, identity outliers, too few photos left;
3. write the crops and captions of the kept photos (each atomically; an unchanged crop is not rewritten),
   remove crops no longer wanted, then write the manifest, which marks the data complete, and qa.html.
Source photos are only ever read. A run that would change nothing writes nothing.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import NamedTuple

import numpy as np
from rich.console import Console

from lookalike import display
from lookalike.config import StudyConfig, SubjectConfig
from lookalike.data import checks
from lookalike.data.captions import describe_photos, empty_caption, read_caption
from lookalike.data.crop import box_in_crop, bucket_crop_box, center_crop_box, crop_and_resize, crop_size, face_crop_box
from lookalike.data.images import load_rgb, not_an_image
from lookalike.data.qa_report import print_summary, write_qa_page
from lookalike.errors import LookalikeError
from lookalike.faces import BACKENDS, FaceRule, backend_class, load_backend
from lookalike.faces.facenet_backend import MtcnnDetector
from lookalike.progress import progress_bar
from lookalike.workspace import Workspace, atomic_path, exclusive, file_sha256, read_json, write_json

INSPECTION_FORMAT = 2  # bump when what inspect() records changes, so old manifests are re-inspected
THUMBNAIL = 256
CONVERSIONS = {"CMYK": "converted from CMYK to RGB", "I;16": "16-bit image scaled to 8 bits",
               "I;16B": "16-bit image scaled to 8 bits", "I": "16-bit image scaled to 8 bits",
               "RGBA": "transparency flattened onto white", "LA": "transparency flattened onto white",
               "P": "palette image converted to RGB", "L": "greyscale image converted to RGB"}


@dataclass
class Photo:
    """One source file: what inspection found (reused while its bytes and settings hold), then the decisions."""

    source: str
    sha256: str | None = None
    inspected_with: str = ""
    size: list[int] | None = None  # width, height after EXIF orientation
    frames: int = 1
    mode: str | None = None  # the file's own pixel format (PIL mode), before conversion to 8-bit RGB
    phash: str | None = None  # 64-bit perceptual hash, hex
    faces: list[dict] = field(default_factory=list)  # {"box": [l, t, r, b], "probability": p}
    embeddings: list[list[float]] = field(default_factory=list)  # one per face, by the identity backend
    thumbnail: str | None = None  # qa/<file>.jpg, relative to data/
    error: str | None = None
    # Decided across photos:
    face: int | None = None  # index of the subject's face in `faces`
    crop_box: list[int] | None = None
    upscale: float | None = None
    checks: dict[str, dict] = field(default_factory=dict)  # name -> {"result": pass|warn|exclude, "reason"}
    status: str = "excluded"  # kept | excluded
    reasons: list[str] = field(default_factory=list)
    output: str | None = None  # images/<file>.png, relative to data/
    caption: str | None = None


def source_files(folder: Path) -> list[Path]:
    """Every file of the subject's folder but captions and hidden files: a file that is not a readable image
    gets a reason in the manifest rather than being passed over in silence."""
    if not folder.is_dir():
        raise LookalikeError(f"subject.images: folder not found: {folder}")
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
                   and p.suffix.lower() != ".txt")
    if not files:
        raise LookalikeError(f"subject.images: no photos in {folder}")
    return files


def caption_for(photo: Path, default: str, console: Console) -> str:
    """A caption .txt beside the photo wins over the config's default caption; an empty one does not, and says so."""
    beside = photo.with_suffix(".txt")
    caption = read_caption(beside)
    if caption == "":
        empty_caption(beside, console)
    return caption or default


def inspection_settings(config: StudyConfig) -> str:
    """What a photo's inspection depends on besides its bytes, as a digest (no model is loaded for it)."""
    backend = config.evaluate.face_backend
    facts = [INSPECTION_FORMAT, config.data.crop, config.evaluate.min_face_size, metadata.version("facenet-pytorch"),
             backend, metadata.version(BACKENDS[backend][2])]
    return hashlib.sha256(json.dumps(facts).encode()).hexdigest()[:16]


class Inspector:
    """The detector and identity backend, loaded on first use: a re-run with nothing new loads no model."""

    def __init__(self, config: StudyConfig):
        self.config = config
        self._models = None

    def load(self):
        if self._models is None:
            detector = MtcnnDetector()
            identity = load_backend(self.config.evaluate.face_backend)
            self._models = detector, FaceRule.for_backend(detector, None, self.config.evaluate.min_face_size), identity
        return self._models

    def inspect(self, path: Path, sha256: str, settings: str, data: Path) -> Photo:
        """What one photo holds; its thumbnail goes into data/qa."""
        from PIL import Image

        photo = Photo(source=str(path), sha256=sha256, inspected_with=settings)
        try:
            image = load_rgb(path)
            with Image.open(path) as original:
                photo.frames, photo.mode = getattr(original, "n_frames", 1), original.mode
        except OSError as error:
            photo.error = f"unreadable: {error}"
            return photo
        photo.size = list(image.size)
        photo.phash = checks.perceptual_hash(image)
        thumbnail = image.copy()
        thumbnail.thumbnail((THUMBNAIL, THUMBNAIL))
        photo.thumbnail = f"qa/{photo.sha256[:16]}.jpg"
        with atomic_path(data / photo.thumbnail) as tmp:
            thumbnail.save(tmp, format="JPEG", quality=85)
        if self.config.data.crop == "face":
            detector, rule, identity = self.load()
            faces = rule.faces(detector, image)
            photo.faces = [{"box": [round(v, 1) for v in f.box], "probability": round(f.score, 4)} for f in faces]
            embeddings = identity.embed([(image, face) for face in faces])
            photo.embeddings = [[round(float(v), 6) for v in row] for row in embeddings]
        return photo

    @property
    def same_person_threshold(self) -> float:
        return backend_class(self.config.evaluate.face_backend).same_person_threshold


def _check(photo: Photo, name: str, action: str, failed: bool, reason: str) -> None:
    """Record one check's result; a failed check warns or excludes as configured ('off': not recorded)."""
    if action == "off":
        return
    photo.checks[name] = {"result": action if failed else "pass", "reason": reason if failed else None}
    if failed:
        photo.reasons.append(reason if action == "exclude" else f"warning: {reason}")


@dataclass(frozen=True)
class _Across:
    """What prepare finds across one person's photos: each photo's name, the face chosen in it, whether a
    consistent identity anchored that choice, the duplicates (index -> (kind, earlier index, bits)) and the
    identity outliers (index -> median distance)."""

    names: list[str]
    chosen: list[int | None]
    anchored: bool
    repeats: dict
    strangers: dict


def _across(photos: list[Photo], data, act, same_person_threshold: float) -> _Across:
    embeddings = [np.asarray(p.embeddings, dtype=np.float32) if p.faces else None for p in photos]
    areas = [[(f["box"][2] - f["box"][0]) * (f["box"][3] - f["box"][1]) for f in p.faces] for p in photos]
    chosen = checks.choose_faces(embeddings, areas)
    repeats = checks.duplicates([p.sha256 if p.error is None else None for p in photos],
                                [int(p.phash, 16) if p.phash else None for p in photos], data.near_duplicate_bits)
    candidates = {i: embeddings[i][chosen[i]] for i in range(len(photos)) if chosen[i] is not None
                  and i not in repeats}
    strangers = checks.identity_outliers(candidates, same_person_threshold) if act.identity_outlier != "off" else {}
    return _Across([Path(p.source).name for p in photos], chosen, checks.identity_anchor(embeddings) is not None,
                   repeats, strangers)


def decide(photos: list[Photo], config: StudyConfig, same_person_threshold: float,
           subject: SubjectConfig | None = None) -> None:
    """Pass 2: fill in each photo's face, crop, checks and status from what inspection found in all of them, and
    the person's choices by hand ([subject] exclude and keep) over the checks'."""
    subject = subject or config.subject
    data, act = config.data, config.data.checks
    across = _across(photos, data, act, same_person_threshold)
    for index, photo in enumerate(photos):
        photo.checks, photo.reasons, photo.face = {}, [], across.chosen[index]
        photo.crop_box, photo.upscale = None, None
        photo.checks["readable"] = {"result": "exclude" if photo.error else "pass", "reason": photo.error}
        if photo.error:
            photo.reasons.append(photo.error)
            photo.status = "excluded"
            continue
        _notes(photo)
        if data.crop == "face":
            _face_checks(photo, act, across.anchored)
        _crop(photo, data, act)
        _duplicate_check(photo, act, across, index)
        if data.crop == "face":
            _check(photo, "identity_outlier", act.identity_outlier, index in across.strangers,
                   f"face looks like someone else: median distance {across.strangers.get(index, 0):.2f} to the "
                   f"other photos' faces, over the same-person threshold {same_person_threshold:g}")
        photo.status = _status(photo, across.names[index], subject)


def _notes(photo: Photo) -> None:
    """What the user should know of how a readable photo was read."""
    if photo.frames > 1:
        photo.reasons.append(f"warning: animated image, the first of its {photo.frames} frames is used")
    if photo.mode in CONVERSIONS:
        photo.reasons.append(f"note: {CONVERSIONS[photo.mode]}")


def _face_checks(photo: Photo, act, anchored: bool) -> None:
    """no_face and several_faces, where crops are made around the face."""
    _check(photo, "no_face", act.no_face, photo.face is None, "no face found")
    if len(photo.faces) > 1 and photo.face is not None:
        box = ", ".join(str(round(v)) for v in photo.faces[photo.face]["box"])
        why = "the one most like the other photos" if anchored else "the largest"
        _check(photo, "several_faces", act.several_faces, True,
               f"{len(photo.faces)} faces; used face {photo.face + 1} at ({box}), {why}")
    else:
        _check(photo, "several_faces", act.several_faces, False, "")


def _crop(photo: Photo, data, act) -> None:
    """The photo's crop box (around its face, its bucket's framing, or the centre; none for a photo without a face
    that no_face leaves out), and face_too_small, judged by how much the crop is enlarged."""
    face_box = tuple(photo.faces[photo.face]["box"]) if photo.face is not None else None
    cropped = face_box is not None or data.crop == "center" or act.no_face != "exclude"  # else excluded
    if cropped and data.buckets:
        photo.crop_box = list(bucket_crop_box(face_box, tuple(photo.size)))
    elif cropped and face_box is not None:
        photo.crop_box = list(face_crop_box(face_box, tuple(photo.size), data.face_scale))
    elif cropped:
        photo.crop_box = list(center_crop_box(tuple(photo.size)))
    if photo.crop_box is None:
        return
    width, height = photo.crop_box[2] - photo.crop_box[0], photo.crop_box[3] - photo.crop_box[1]
    size = crop_size(tuple(photo.crop_box), data.resolution)
    photo.upscale = round(size[0] / width, 3)
    what = "face crop" if photo.face is not None and not data.buckets else "photo"
    _check(photo, "face_too_small", act.face_too_small, photo.upscale > data.max_upscale,
           f"{what} is {_dimensions((width, height))} px, enlarged {photo.upscale:.1f}x to {_dimensions(size)} px "
           f"(limit {data.max_upscale:g}x)")


def _duplicate_check(photo: Photo, act, across: _Across, index: int) -> None:
    if index in across.repeats:
        kind, earlier, bits = across.repeats[index]
        detail = "same bytes" if kind == "exact" else f"perceptual hashes {bits} of 64 bits apart"
        _check(photo, "duplicate", act.duplicate, True, f"{kind} duplicate of {across.names[earlier]} ({detail})")
    else:
        _check(photo, "duplicate", act.duplicate, False, "")


def _status(photo: Photo, name: str, subject: SubjectConfig) -> str:
    """kept or excluded: by the checks and the crop, then by the person's own choice ([subject] exclude and keep)."""
    excluded = photo.crop_box is None or any(c["result"] == "exclude" for c in photo.checks.values())
    if name in subject.exclude:
        photo.reasons.append("excluded by hand (subject.exclude)")
        excluded = True
    elif name in subject.keep and photo.crop_box is not None and excluded:
        photo.reasons.append("kept by hand (subject.keep), over the checks above")
        excluded = False
    return "excluded" if excluded else "kept"


def _dimensions(size: tuple[int, int]) -> str:
    """A square's side ('512'), or width x height ('640x480')."""
    return str(size[0]) if size[0] == size[1] else f"{size[0]}x{size[1]}"


def _output_name(photo: Photo, resolution: int) -> str:
    digest = hashlib.sha256(f"{photo.sha256} {photo.crop_box} {resolution}".encode()).hexdigest()[:8]
    return f"images/{Path(photo.source).stem}_{digest}.png"


def data_folder(config: StudyConfig, subject: SubjectConfig) -> Path:
    """Where a person's prepared photos go: data/ for [subject], data/<token>/ for each of [[more_subjects]]."""
    data = Workspace(config.workspace).data
    return data if subject.token == config.subject.token else data / subject.token


def prepare(config: StudyConfig, console: Console | None = None, inspector: Inspector | None = None,
            subject: SubjectConfig | None = None) -> list[Photo]:
    """Bring one person's prepared data (default [subject]'s) up to date with their photos and the settings;
    return every photo's record. A caller preparing several times in one process passes the same Inspector,
    so models load once."""
    console = console or display.console()
    subject = subject or config.subject
    data = data_folder(config, subject)
    manifest_file = data / "manifest.json"
    previous = read_json(manifest_file) if manifest_file.is_file() else {"photos": []}
    known = {(p["source"], p["sha256"], p["inspected_with"]): p for p in previous.get("photos", [])}
    settings = inspection_settings(config)

    # 1. Inspect new and changed photos; reuse what was found in the others.
    inspector = inspector or Inspector(config)
    photos, inspected = [], 0
    files = source_files(subject.images)
    with progress_bar(console, f"prepare {subject.token}", total=len(files)) as bar:
        for path in files:
            problem = not_an_image(path)
            if problem:  # told by its header: a video or a document is never read whole
                photos.append(Photo(source=str(path), inspected_with=settings, error=f"unreadable: {problem}"))
                bar.update()
                continue
            sha256 = file_sha256(path)
            old = known.get((str(path), sha256, settings))
            if old is not None and (old["thumbnail"] is None or (data / old["thumbnail"]).is_file()):
                photos.append(_photo(old))
            else:
                photos.append(inspector.inspect(path, sha256, settings, data))
                inspected += 1
            bar.update()

    # 2. Decide across photos; caption the kept ones (the model's words where [data] captioner says so).
    decide(photos, config, inspector.same_person_threshold, subject)
    kept = [p for p in photos if p.status == "kept"]
    described = describe_photos(config.data.captioner, kept, data, config.data.resolution, subject.class_word,
                                console)
    for photo in photos:
        if photo.status == "kept":
            photo.output = _output_name(photo, config.data.resolution)
            default = described.get(photo.source) or subject.caption
            photo.caption = config.fill(caption_for(Path(photo.source), default, console), subject)
        else:
            photo.output = photo.caption = None
    manifest = json.loads(json.dumps({  # as it reads back from disk, to compare with the previous one
        "subject": subject.token, "images": str(subject.images), "resolution": config.data.resolution,
        "kept": len(kept),
        "excluded": len(photos) - len(kept), "photos": [asdict(p) for p in photos]}))

    # 3. Write what changed.
    complete = all((data / p.output).is_file() and (data / p.output).with_suffix(".txt").is_file() for p in kept)
    if manifest != previous or not complete:
        _write_crops(data, kept, config.data.resolution)
        _remove_unused(data, previous, manifest)
        write_json(manifest_file, manifest)
        write_qa_page(data, photos, class_pages(config))
        console.print(f"prepare {subject.token}: {inspected} photos inspected, {len(kept)} kept, "
                      f"{len(photos) - len(kept)} excluded; report {data / 'qa.html'}")
    else:
        console.print(f"prepare {subject.token}: up to date ({len(kept)} photos kept, "
                      f"{len(photos) - len(kept)} excluded)")
    print_summary(console, photos)
    if len(kept) < config.data.min_photos:
        message = (f"only {len(kept)} usable photos in {subject.images} (data.min_photos is "
                   f"{config.data.min_photos}); see {data / 'qa.html'}")
        if config.data.checks.too_few == "error":
            raise LookalikeError(message)
        console.print(f"warning: {message}")
    return photos


def _write_crops(data: Path, kept: list[Photo], resolution: int) -> None:
    """Each kept photo's crop and caption (a crop already there is the same: its name holds its inputs)."""
    for photo in kept:
        output = data / photo.output
        if not output.is_file():
            with atomic_path(output) as tmp:
                # Lossless, but fast: zlib level 1 saves 3x faster than the default, for files ~20% bigger.
                crop = crop_and_resize(load_rgb(Path(photo.source)), tuple(photo.crop_box), resolution)
                crop.save(tmp, "PNG", compress_level=1)
        caption = output.with_suffix(".txt")
        if not caption.is_file() or caption.read_text() != photo.caption:
            with atomic_path(caption) as tmp:
                tmp.write_text(photo.caption)


def _written(manifest: dict) -> set[str]:
    """The files of data/ that prepare wrote for a manifest (crops, captions, thumbnails), relative to data/."""
    files = set()
    for photo in manifest.get("photos", []):
        if photo.get("output"):
            files |= {photo["output"], str(Path(photo["output"]).with_suffix(".txt"))}
        if photo.get("thumbnail"):
            files.add(photo["thumbnail"])
    return files


def _remove_unused(data: Path, previous: dict, manifest: dict) -> None:
    """Remove what the previous manifest recorded as written and the new one no longer uses; never a file that
    prepare did not write itself, nor one outside its own folders (whatever an edited manifest says)."""
    own = [(data / folder).resolve() for folder in ("images", "qa")]
    for name in _written(previous) - _written(manifest):
        path = (data / name).resolve()
        if path.parent in own:
            path.unlink(missing_ok=True)


def _photo(record: dict) -> Photo:
    """A photo's record as its manifest holds it (keys of older formats left out)."""
    return Photo(**{k: v for k, v in record.items() if k in Photo.__dataclass_fields__})


def class_pages(config: StudyConfig) -> list[Path]:
    """The pages of the class images drawn for prior preservation (train/prior.py), one per base and size."""
    return sorted((Workspace(config.workspace).root / "prior").glob("*/index.html"))


def write_qa_pages(config: StudyConfig) -> None:
    """Every person's qa.html again from their manifest: after class images were drawn, so that it shows them."""
    with exclusive(Workspace(config.workspace).data / ".prepare.lock"):
        for person in config.people:
            data = data_folder(config, person)
            if (data / "manifest.json").is_file():
                photos = [_photo(record) for record in read_json(data / "manifest.json")["photos"]]
                write_qa_page(data, photos, class_pages(config))


def prepare_study(config: StudyConfig, console: Console) -> dict[str, list[Photo]]:
    """Every person's photos prepared (models loaded once); token -> photo records. One process at a time: a
    sweep's parallel runs all prepare the same data, and one would otherwise remove the files another is
    still writing."""
    with exclusive(Workspace(config.workspace).data / ".prepare.lock"):
        inspector = Inspector(config)
        return {person.token: prepare(config, console, inspector, person) for person in config.people}


class PreparedPhoto(NamedTuple):
    crop: Path
    caption: str
    person: SubjectConfig
    face: tuple[float, float, float, float] | None  # the face used, as fractions of the crop (None: no face)


def prepared_photos(config: StudyConfig, console: Console) -> list[PreparedPhoto]:
    """Every kept photo of every person, preparing first what is missing or out of date."""
    return [PreparedPhoto(data_folder(config, person) / p.output, p.caption, person,
                          box_in_crop(p.faces[p.face]["box"], tuple(p.crop_box)) if p.face is not None else None)
            for person, photos in zip(config.people, prepare_study(config, console).values())
            for p in photos if p.status == "kept"]


def caption_study(config: StudyConfig, model: str | None, console: Console) -> dict[str, list[Photo]]:
    """`lookalike caption`: each kept photo captioned by `model` (default [data] captioner) into data/captions/,
    then prepared with those captions."""
    chosen = model or config.data.captioner
    if chosen is None:
        raise LookalikeError("give --model ID, or set [data] captioner (e.g. Salesforce/blip-image-captioning-large)")
    return prepare_study(config.model_copy(update={"data": config.data.model_copy(update={"captioner": chosen})}),
                         console)
