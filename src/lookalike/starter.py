"""`lookalike init`: a commented starter study for one base, the way users start from a trainer's example configs.
Everything it says of the base comes from the registry (models/families/); the keys it leaves out take their
defaults, the base's reference recipe among them (docs/bases.md)."""

from __future__ import annotations

import json
from pathlib import Path

from lookalike.errors import LookalikeError
from lookalike.models.families import FAMILIES, KNOWN_BASES
from lookalike.presets import presets

# The settings a first run on a real GPU starts from: the "balanced" preset's (presets.py), written out so they are
# easy to change.
STARTER_TRAIN = """[train]
# The keys left out take their defaults: the base's reference recipe for how noise levels are drawn and which VAE
# latents train (docs/bases.md), lookalike's own for the rest (docs/configuration.md lists every key). The studio's
# presets: quick, balanced (these), best likeness, reference script.
rank = {rank}
learning_rate = {learning_rate:g}
max_train_steps = {max_train_steps}
# "diffusers": the reference script's layers.
target_modules = "attention"
# Samples scored for likeness while training; the best step's LoRA is kept.
sample_every = 250
# `lookalike train --resume` continues from the latest.
checkpoint_every = 250
# Much less memory for a slower step; the dry run says whether the GPU needs it, and what else would fit.
# gradient_checkpointing = true
"""


def starter_config(base: str, photos: str, token: str, path_hint: str = "study.toml") -> str:
    """The text of a starter study of `base` training `token` on the photos in `photos`."""
    if base not in KNOWN_BASES:
        raise LookalikeError(f"--base: {base!r} is not a known base; known: {', '.join(KNOWN_BASES)}")
    if not token or any(c.isspace() for c in token) or '"' in token or "\\" in token:
        raise LookalikeError(f"--token: {token!r} must be one word without spaces or quotes")
    info = KNOWN_BASES[base]
    family = FAMILIES[info.family]
    about = [f"# A lookalike study: {token} on {base} ({family.title})."]
    if info.repo:
        about.append(f"# Downloaded from the Hugging Face Hub: {info.repo}"
                     + (" (gated: accept its licence on the hub, then run `hf auth login` once)." if info.gated
                        else "."))
    if info.licence:
        about.append(f"# Licence: {info.licence} (read the model card before use).")
    about.append(f"# Check what a run needs first: lookalike train {path_hint} --dry-run --gpu-memory 24GB")
    side = info.resolution or 1024
    balanced = presets(base)["balanced"]
    return "\n".join(about) + f"""
name = {json.dumps(f"{token}-{base}")}
# Everything the study writes; relative to this file.
workspace = "work"

[model]
base = {json.dumps(base)}

[subject]
# The trigger word: prompts write it as {{token}}.
token = {json.dumps(token)}
# What the subject is (man, woman, person).
class_word = "person"
# Your photos (only read, never changed); relative to this file.
images = {json.dumps(photos)}

[data]
resolution = {side}

{STARTER_TRAIN.format(**{key.removeprefix("train."): value for key, value in balanced.items()})}
[generate]
# Steps and guidance scale: the base's own unless set here.
prompts = ["a photo of {{token}}", "{{token}} smiling at the camera", "portrait of {{token}}, studio lighting"]
seeds = [0, 1]

[evaluate]
face_backend = "facenet"
"""


def write_starter(path: Path, base: str, photos: str, token: str) -> Path:
    """Write the starter study to `path`, a new file (an existing one is never written over)."""
    text = starter_config(base, photos, token, str(path))
    if path.exists():
        raise LookalikeError(f"{path} already exists: give init a new file name")
    if path.suffix != ".toml":
        raise LookalikeError(f"{path}: a study written by init is TOML; name it *.toml")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "x") as file:  # "x": never over a file that appeared meanwhile
        file.write(text)
    return path
