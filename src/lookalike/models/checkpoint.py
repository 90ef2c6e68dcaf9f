"""A single-file checkpoint of a base ([model] checkpoint): a community fine-tune, as ComfyUI's checkpoints and
diffusion_models folders, kohya and ai-toolkit take one. For a transformer base it is the transformer alone, in its
original layout (Black Forest Labs' for FLUX.1) or in diffusers'; for SD 1.x and SDXL, the whole model in the
original (LDM / SGM) layout: UNet, and usually VAE and text encoders, which a fine-tune may have changed too.

Its weights become the base's components in a folder of the workspace, bases/<file>-<hash>/, made once per file:
converted by diffusers' own from_single_file with the base's configs; the components the file does not hold
(tokenizers, scheduler, and any model it lacks) are links to the base's. Every later step loads that folder as a
local diffusers base.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from lookalike import display
from lookalike.errors import LookalikeError
from lookalike.models.base import check_drawing_base, drawing_base, load_component, resolve_base
from lookalike.models.families import base_family
from lookalike.workspace import TEMPORARY_NAME, build_once, exclusive, file_sha256, read_json, write_json

RECORD = "checkpoint.json"  # in a made folder: the file it was made of (its path, size, time and SHA-256)
# What an all-in-one file of a transformer base holds beside its transformer, by the prefixes of the original
# layouts' keys (ComfyUI's and the original repositories'): lookalike reads the transformer only.
OTHER_PARTS = {"text encoders": ("text_encoders.", "cond_stage_model.", "conditioner."),
               "VAE": ("first_stage_model.", "vae.")}


def trained_base_folder(config) -> Path:
    """The folder the trained base loads from: model.base's, or with model.checkpoint its fine-tune's."""
    if config.model.checkpoint is None:
        return resolve_base(config.model.base, config.model.revision)
    return checkpoint_folder(config.model, config.workspace)


def resolve_drawing_base(config) -> Path:
    """The drawing base's folder: the trained base's (trained_base_folder), or [generate] base's (model.revision
    and model.checkpoint are model.base's only)."""
    check_drawing_base(config)
    base = drawing_base(config)
    return trained_base_folder(config) if base == config.model.base else resolve_base(base)


def drawn_checkpoint(config) -> str | None:
    """The single-file checkpoint whose weights the drawing base has, as generated images' settings name it (its
    file name, size and time: cheap, so that listing which images are current never hashes or converts it), so
    that images of a base alone and of a fine-tune of it are never taken for each other; None when the drawing
    base has none."""
    if config.model.checkpoint is None or drawing_base(config) != config.model.base:
        return None
    file = Path(config.model.checkpoint)
    if not file.is_file():  # gone since: no image can be told to be of it any more
        return f"{file.name} (missing)"
    stat = file.stat()
    return f"{file.name}, {stat.st_size} bytes, modified {stat.st_mtime_ns} ns"


def checkpoint_folder(model, workspace: Path) -> Path:
    """The folder of `model.base` with the components `model.checkpoint` holds, made on first use."""
    file = Path(model.checkpoint)
    if not file.is_file():
        raise LookalikeError(f"model.checkpoint: file not found: {file}")
    if file.suffix != ".safetensors":
        raise LookalikeError(f"model.checkpoint: {file} is not a .safetensors file (a pickled one can run code)")
    family = base_family(model.base)  # told before anything is downloaded
    parts = held_components(file, family)
    base = resolve_base(model.base, model.revision, without_weights=parts)  # the file's replace them
    made = workspace / "bases"
    stat = file.stat()
    seen = {"file": str(file.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "base": str(base)}
    found = _made_from(made, seen)
    if found is not None:  # made before: no need to hash the file again
        return found
    _file_keys(file)  # a file that is no safetensors file is told by its header, before it is read whole
    # One process converts at a time; whatever hidden folder a killed one left is then debris.
    with exclusive(workspace / ".bases.lock"):
        for debris in made.iterdir() if made.is_dir() else []:
            if debris.is_dir() and TEMPORARY_NAME.fullmatch(debris.name):
                shutil.rmtree(debris, ignore_errors=True)
        return _convert_once(file, model, family, parts, base, made, seen)


def _made_from(made: Path, seen: dict) -> Path | None:
    """The folder made earlier from the file `seen` describes (its path, size, time and base), else None."""
    for record in made.glob(f"*/{RECORD}") if made.is_dir() else []:
        if not TEMPORARY_NAME.fullmatch(record.parent.name) and \
                {k: v for k, v in read_json(record).items() if k in seen} == seen:
            return record.parent
    return None


def _convert_once(file: Path, model, family, parts: tuple[str, ...], base: Path, made: Path, seen: dict) -> Path:
    """The folder of `file`'s content, converted now unless an earlier conversion holds that content (a file
    touched or copied since, the same bytes: its record then names it at its new size and time)."""
    found = _made_from(made, seen)  # made by another process while this one waited
    if found is not None:
        return found
    display.console().print(f"model.checkpoint: making {file.name} into a diffusers folder of {model.base} under "
                            f"{made} (once per file; its SHA-256 first)")
    digest = file_sha256(file)
    folder = made / f"{file.stem}-{digest[:12]}"
    if (folder / RECORD).is_file() and read_json(folder / RECORD).get("base") == seen["base"]:
        write_json(folder / RECORD, {**seen, "sha256": digest})
        return folder

    def convert(tmp: Path) -> None:
        others = _other_parts(file) if family.single_file_parts is None else {}
        if others:
            display.console().print(f"note: model.checkpoint: {file.name} also holds {' and '.join(others)}; lookalike "
                                    f"reads its transformer only, and keeps {model.base}'s {' and '.join(others)}")
        try:
            models = _read_single_file(file, family, base, parts, {name for names in others.values() for name in names})
            # Saving is where some mismatches first show (a text encoder of another width is left on the meta
            # device: "Cannot copy out of meta tensor").
            for name, weights in models.items():
                weights.save_pretrained(tmp / name)
        except MemoryError:
            raise
        except Exception as error:  # diffusers' converters fail in many ways on another model's keys
            if isinstance(error, OSError) and error.errno is not None:
                raise  # a full disk, a read-only folder: the command line says so
            what = model.base if family.single_file_parts else f"{model.base}'s transformer"
            raise LookalikeError(f"model.checkpoint: {file} is not a checkpoint of {what} "
                                 f"({type(error).__name__}: {str(error).splitlines()[0][:200]})") from None
        for entry in base.iterdir():  # the rest is the base's own, linked
            if entry.name not in models and not entry.name.startswith("."):
                os.symlink(entry.resolve(), tmp / entry.name)
        write_json(tmp / RECORD, {**seen, "sha256": digest})

    return build_once(folder, RECORD, convert)


def held_components(file: Path, family) -> tuple[str, ...]:
    """The base's components whose weights `file` holds: the denoiser alone for a transformer family; for SD 1.x
    and SDXL, each part whose keys the file has (read from its header only), the UNet at least."""
    if family.single_file_parts is None:
        return (family.denoiser,)
    keys = _file_keys(file)
    held = tuple(name for name, prefix in family.single_file_parts.items() if any(k.startswith(prefix) for k in keys))
    if family.denoiser not in held:
        raise LookalikeError(f"model.checkpoint: {file} holds no {family.name} UNet (no key starts with "
                             f"{family.single_file_parts[family.denoiser]!r}): is it a checkpoint of another model?")
    return held


def _other_parts(file: Path) -> dict[str, list[str]]:
    """What beside a transformer `file` holds (OTHER_PARTS), with the names of its tensors."""
    keys = _file_keys(file)
    found = {part: [k for k in keys if k.startswith(prefixes)] for part, prefixes in OTHER_PARTS.items()}
    return {part: names for part, names in found.items() if names}


def _tensors_but(file: Path, left_out: set[str]) -> dict:
    """The file's tensors but those named in `left_out`."""
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as handle:
        return {name: handle.get_tensor(name) for name in handle.keys() if name not in left_out}


def _file_keys(file: Path) -> list[str]:
    """The names of a safetensors file's tensors, from its header (no tensor is read)."""
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt") as handle:
            return list(handle.keys())
    except Exception as error:  # safetensors' own error for a file that is not one
        raise LookalikeError(f"model.checkpoint: {file} is not a readable .safetensors file ({error})") from None


def _read_single_file(file: Path, family, base: Path, parts: tuple[str, ...], others: set[str]) -> dict:
    """The models `file` holds, by component, converted by diffusers with the configs of `base`; `others`: the
    tensors of an all-in-one transformer file that are not the transformer's."""
    dtype = _stored_dtype(file)
    if family.single_file_parts is None:
        denoiser = family.component_class(family.denoiser)
        # Of an all-in-one file, the transformer's tensors alone: diffusers' converters take no other model's.
        return {family.denoiser: denoiser.from_single_file(_tensors_but(file, others) if others else str(file),
                                                            config=str(base), subfolder=family.denoiser,
                                                            torch_dtype=dtype, local_files_only=True)}
    # A part the file lacks (many fine-tunes leave the VAE out) is the base's: diffusers would not look for it.
    lacking = {name: load_component(base, name, dtype) for name in family.single_file_parts if name not in parts}
    pipe = family.pipeline_class().from_single_file(str(file), config=str(base), torch_dtype=dtype,
                                                    local_files_only=True, **family.pipeline_overrides(), **lacking)
    return {name: getattr(pipe, name) for name in parts}


STORED = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}  # safetensors' names of the types kept as they are


def _stored_dtype(file: Path):
    """The type most of the file's tensors are stored in (fine-tunes come in bf16, fp16 or fp32), kept as it is;
    a file of another type (fp8) loads in bf16."""
    from collections import Counter

    import torch
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as handle:
        kinds = Counter(handle.get_slice(name).get_dtype() for name in handle.keys())
    kept = [kind for kind, _ in kinds.most_common() if kind in STORED]
    return getattr(torch, STORED[kept[0]]) if kept else torch.bfloat16
