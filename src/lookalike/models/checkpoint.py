"""A single-file checkpoint of a base's transformer ([model] checkpoint): a community fine-tune, as ComfyUI's
diffusion_models folder and ai-toolkit take one, in its original layout (Black Forest Labs' for FLUX.1) or in
diffusers'. Its weights become the base's transformer in a folder of the workspace, bases/<file>-<hash>/, made once
per file: the transformer converted by diffusers' own from_single_file with the base's config, the other
components linked to the base's. Every later step loads that folder as a local diffusers base.

SD 1.x and SDXL single files hold their text encoders and VAE too, which a fine-tune may have changed, so they are
refused rather than half read.
"""

from __future__ import annotations

import os
from pathlib import Path

from lookalike import display
from lookalike.data.images import file_sha256
from lookalike.errors import LookalikeError
from lookalike.models.base import check_drawing_base, drawing_base, resolve_base
from lookalike.models.families import base_family
from lookalike.workspace import build_once, read_json, write_json

RECORD = "checkpoint.json"  # in a made folder: the file it was made of (its path, size, time and SHA-256)


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


def checkpoint_folder(model, workspace: Path) -> Path:
    """The folder of `model.base` with `model.checkpoint`'s transformer, made on first use."""
    file = Path(model.checkpoint)
    if not file.is_file():
        raise LookalikeError(f"model.checkpoint: file not found: {file}")
    if file.suffix != ".safetensors":
        raise LookalikeError(f"model.checkpoint: {file} is not a .safetensors file (a pickled one can run code)")
    family = base_family(model.base)  # told before anything is downloaded
    if family.denoiser != "transformer":
        raise LookalikeError(f"model.checkpoint: single files of {family.name} bases hold their text encoders and VAE "
                             "too, which lookalike does not read from them: convert the file to a diffusers folder "
                             "(diffusers' from_single_file, then save_pretrained) and set model.base to it")
    base = resolve_base(model.base, model.revision, denoiser_weights=False)  # the file's replace them
    made = workspace / "bases"
    stat = file.stat()
    seen = {"file": str(file.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "base": str(base)}
    for record in made.glob(f"*/{RECORD}") if made.is_dir() else []:  # made before: no need to hash the file again
        if {k: v for k, v in read_json(record).items() if k in seen} == seen:
            return record.parent
    display.console().print(f"model.checkpoint: making {file.name} into a diffusers folder of {model.base} under "
                            f"{made} (once per file; its SHA-256 first)")
    digest = file_sha256(file)

    def convert(tmp: Path) -> None:
        transformer = family.component_class("transformer")
        try:
            weights = transformer.from_single_file(str(file), config=str(base), subfolder="transformer",
                                                   torch_dtype=_stored_dtype(file), local_files_only=True)
        except MemoryError:
            raise
        except Exception as error:  # diffusers' converters fail in many ways on another model's keys
            raise LookalikeError(f"model.checkpoint: {file} is not a checkpoint of {model.base}'s transformer "
                                 f"({type(error).__name__}: {str(error).splitlines()[0][:200]})") from None
        weights.save_pretrained(tmp / "transformer")
        for entry in base.iterdir():  # the rest is the base's own, linked
            if entry.name != "transformer" and not entry.name.startswith("."):
                os.symlink(entry.resolve(), tmp / entry.name)
        write_json(tmp / RECORD, {**seen, "sha256": digest})

    return build_once(made / f"{file.stem}-{digest[:12]}", RECORD, convert)


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
