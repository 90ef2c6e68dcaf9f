"""What a run was trained on, kept in its folder (config.json: the settings; photos.json: each example's crop and
caption), and how that differs from what the study asks for now. A run resumes only on the same settings and
photos (a checkpoint's data order means nothing for another set of photos), and a finished run trained on others
is named as such wherever its results are shown, never passed off as the study's current settings."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import ValidationError

from lookalike.config import StudyConfig
from lookalike.data.images import list_images
from lookalike.display import trained_base
from lookalike.errors import LookalikeError
from lookalike.workspace import RunPaths, file_sha256, read_json, write_json

# The config sections that shape a LoRA's weights; [generate] or [evaluate] may change between sessions.
TRAINING_SECTIONS = ("model", "subject", "more_subjects", "data", "train", "prior")
# Keys of those sections that change only how fast the same weights are made: compiled blocks compute what eager
# ones do (tests/test_compile.py). A run trained or resumed with another value is the same run.
SPEED_ONLY_KEYS = ("train.compile",)


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _with_current_defaults(saved: dict[str, Any]) -> dict[str, Any]:
    """A run's saved config with the keys this version added at their defaults; as saved where it no longer
    validates (a key since removed: the comparison then names it)."""
    try:
        return StudyConfig.model_validate(saved).to_json_dict()
    except ValidationError:
        return saved


def _without_references(data: dict[str, Any]) -> dict[str, Any]:
    """A config's data without each person's held-out references."""
    people = {"subject": {k: v for k, v in data.get("subject", {}).items() if k != "references"},
              "more_subjects": [{k: v for k, v in person.items() if k != "references"}
                                for person in data.get("more_subjects", [])]}
    return {**data, **people}


def changed_settings(run: RunPaths, config: StudyConfig, references: bool = True) -> list[str]:
    """The training keys (section.key) whose values differ between the run's saved config and `config`.
    references=False leaves out each person's held-out references, which only measure (a finished run's images
    are scored again against new ones; a run in progress keeps its own, so its sample steps compare alike)."""
    views = [_with_current_defaults(read_json(run.config)), config.to_json_dict()]
    before, now = ({k: v for k, v in _flatten(data if references else _without_references(data)).items()
                    if k.split(".")[0] in TRAINING_SECTIONS and k not in SPEED_ONLY_KEYS} for data in views)
    return sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k))


def _examples(images, workspace: Path) -> dict[str, str]:
    """crop (relative to the workspace) -> caption, of the subject examples a run trains on."""
    return {str(Path(image.path).relative_to(workspace)): image.caption for image in images}


def record_photos(run: RunPaths, images, workspace: Path) -> None:
    write_json(run.photos, _examples(images, workspace))


def photo_changes(run: RunPaths, images, workspace: Path) -> str | None:
    """How the photos a run trained on differ from `images`, e.g. "1 added (images/5_1a2b3c4d.png), 1 caption
    changed (images/2_5e6f7a8b.png)"; None when they are the same, or the run kept no record (an older one)."""
    if not run.photos.is_file():
        return None
    before, now = read_json(run.photos), _examples(images, workspace)
    added = sorted(now.keys() - before.keys())
    removed = sorted(before.keys() - now.keys())
    recaptioned = sorted(crop for crop in now.keys() & before.keys() if now[crop] != before[crop])
    parts = [f"{len(names)} {what} ({_some(names)})"
             for what, names in (("added", added), ("removed", removed), ("caption changed", recaptioned)) if names]
    return ", ".join(parts) or None


def class_photos(config: StudyConfig) -> dict[str, str]:
    """file -> SHA-256 of the class images a run takes from [prior] images (none when it takes none: drawn ones are
    the base's, named by their own sidecars; a folder that cannot be read holds none)."""
    if not config.prior.num_class_images or config.prior.images is None:
        return {}
    try:
        files = list_images(config.prior.images, "prior.images")[:config.prior.num_class_images]
    except LookalikeError:
        return {}
    return {str(path): file_sha256(path) for path in files}


def record_class_photos(run: RunPaths, config: StudyConfig) -> None:
    write_json(run.class_photos, class_photos(config))


def class_photo_changes(run: RunPaths, config: StudyConfig) -> str | None:
    """How the class images of [prior] images differ from those the run trained on, e.g. "1 changed (3.jpg)"; None
    when they are the same, or the run kept no record (an older one)."""
    if not run.class_photos.is_file():
        return None
    before, now = read_json(run.class_photos), class_photos(config)
    kinds = (("added", sorted(now.keys() - before.keys())), ("removed", sorted(before.keys() - now.keys())),
             ("changed", sorted(name for name in now.keys() & before.keys() if now[name] != before[name])))
    parts = [f"{len(names)} {what} ({_some([Path(name).name for name in names])})" for what, names in kinds if names]
    return ", ".join(parts) or None


def _some(names: list[str], shown: int = 3) -> str:
    """The first few names, and how many more: a line that stays readable in a table."""
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


def init_lora_changed(run: RunPaths, config: StudyConfig) -> bool:
    """Whether train.init_lora's file now differs from the copy the run started from (a run that kept none, or a
    file since removed, has nothing to compare)."""
    source = config.train.init_lora
    if source is None or not run.init_lora.is_file() or not Path(source).is_file():
        return False
    return file_sha256(Path(source)) != file_sha256(run.init_lora)


def checkpoint_changed(run: RunPaths, config: StudyConfig) -> bool:
    """Whether model.checkpoint's file now differs from the one the run trained on (hashed again only when its size
    or time changed; a run that kept no record, or a file since removed, has nothing to compare)."""
    file = config.model.checkpoint
    if file is None or not run.checkpoint_record.is_file() or not Path(file).is_file():
        return False
    trained, stat = read_json(run.checkpoint_record), Path(file).stat()
    if (trained.get("size"), trained.get("mtime_ns")) == (stat.st_size, stat.st_mtime_ns):
        return False
    return file_sha256(Path(file)) != trained.get("sha256")


def trained_base_problem(run: RunPaths, config: StudyConfig) -> str | None:
    """Why `config` would draw the run's LoRA on another base than the one it trained on (model.base, with the
    fine-tune of model.checkpoint and that file's content), or None. A [generate] base of the same family is the
    user's own choice of another base, checked by check_drawing_base; a run that kept no config has nothing to
    compare."""
    if config.generate.base not in (None, config.model.base) or not run.config.is_file():
        return None
    model = read_json(run.config).get("model", {})
    was = (model.get("base"), Path(model["checkpoint"]).resolve() if model.get("checkpoint") else None)
    now = (config.model.base, Path(config.model.checkpoint).resolve() if config.model.checkpoint else None)
    if was == now and not checkpoint_changed(run, config):
        return None
    trained = trained_base(was[0], was[1])
    asked = trained_base(now[0], now[1]) + (" (a changed file)" if was == now else "")
    return (f"run {run.name!r} was trained on {trained}, and the config now draws on {asked}: its LoRA is drawn "
            "only on the base it trained on (use the config it was trained with, or train a new run)")


def stale_reason(run: RunPaths, config: StudyConfig, images, workspace: Path) -> str | None:
    """Why a finished run's results are not of what the study now asks for it (other settings or photos), or None
    when they are."""
    differences = []
    settings = changed_settings(run, config, references=False) if run.config.is_file() else []
    if settings:
        differences.append(f"settings ({', '.join(settings)})")
    if init_lora_changed(run, config):
        differences.append(f"settings (train.init_lora: {config.train.init_lora} changed since the run started from "
                           "it)")
    if checkpoint_changed(run, config):
        differences.append(f"settings (model.checkpoint: {config.model.checkpoint} changed since the run trained on "
                           "it)")
    photos = photo_changes(run, images, workspace)
    if photos:
        differences.append(f"photos ({photos})")
    classes = class_photo_changes(run, config)
    if classes:
        differences.append(f"class images of prior.images ({classes})")
    if not differences:
        return None
    return (f"trained on other {' and '.join(differences)} than the study now asks for, so its results are of "
            f"those; to train it anew, rename the experiment or move {run.root} away")


# The only learning-rate schedule whose rates do not depend on max_train_steps: a run of it trained longer is what a
# run of the longer length gives (the warm-up, counted in steps, is the same).
STEP_COUNT_FREE_SCHEDULES = ("constant",)


def extended_from(run: RunPaths, config: StudyConfig) -> int | None:
    """The steps a run was trained for, when `config` asks for more of it and nothing else (train --resume then
    trains it on to the new length); None when `config` asks for anything else. Refuses a longer run that would
    not be what that many steps from the start give: a schedule whose rates depend on the step count, a run that
    stopped early."""
    if changed_settings(run, config) != ["train.max_train_steps"]:
        return None
    before, now = read_json(run.config)["train"]["max_train_steps"], config.train.max_train_steps
    if now < before:
        raise LookalikeError(f"cannot resume run {run.name!r} at train.max_train_steps = {now}: it trains for "
                             f"{before}; its scored sample steps' LoRAs are kept (generate --checkpoint STEP), or "
                             "start a new --run")
    if config.train.lr_scheduler not in STEP_COUNT_FREE_SCHEDULES:
        raise LookalikeError(f"cannot train run {run.name!r} on to {now} steps: its lr_scheduler "
                             f"{config.train.lr_scheduler!r} sets each step's rate from max_train_steps ({before}), so "
                             f"the longer run would not be a {now}-step one; start a new --run (runs of lr_scheduler "
                             "'constant' can be trained on)")
    stopped = (run.read_status() or {}).get("stopped_at")
    if stopped is not None:
        raise LookalikeError(f"cannot train run {run.name!r} on to {now} steps: train.stop_when stopped it at step "
                             f"{stopped}; start a new --run")
    return before


def trains_on(run: RunPaths, config: StudyConfig) -> bool:
    """Whether `config` asks a finished run for more steps that it can be trained on to (extended_from); a run that
    cannot is stale instead, as for any other change."""
    try:
        return extended_from(run, config) is not None
    except LookalikeError:
        return False
