"""Model families: everything that differs from one base model to another, behind one interface.

A family knows its bases (hub ids and their generation defaults), how to recognise a local diffusers folder
of its own (model_index.json names the pipeline class), its components' classes, how a caption is encoded and
what of it is cached, how clean latents become the transformer's input and how the transformer is called, the
LoRA target presets, and how a pipeline is handed cached embeddings. The trainer, the cache, generation and
the CLI ask the family; none of them knows a base's internals.

Families: FLUX.1 (flux1.py), FLUX.2 [klein] (flux2.py), FLUX.2 [dev] (flux2_dev.py), Qwen-Image (qwen_image.py),
Qwen-Image 2.1 (qwen_image21.py), Z-Image (z_image.py), Krea 2 (krea2.py), Stable Diffusion 1.x and XL
(stable_diffusion.py), and Stable Diffusion 3 and 3.5 (sd3.py).
"""

from __future__ import annotations

import json
from pathlib import Path

from lookalike.errors import LookalikeError
from lookalike.models.families.flux1 import Flux1
from lookalike.models.families.flux2 import Flux2
from lookalike.models.families.flux2_dev import Flux2Dev
from lookalike.models.families.interface import BaseModelInfo, Family
from lookalike.models.families.krea2 import Krea2
from lookalike.models.families.qwen_image import QwenImage
from lookalike.models.families.qwen_image21 import QwenImage21
from lookalike.models.families.sd3 import StableDiffusion3
from lookalike.models.families.stable_diffusion import StableDiffusion1, StableDiffusionXL
from lookalike.models.families.z_image import ZImage

FAMILIES: dict[str, Family] = {family.name: family for family in (Flux1(), Flux2(), Flux2Dev(), QwenImage(),
                                                                  QwenImage21(), ZImage(), Krea2(),
                                                                  StableDiffusionXL(), StableDiffusion1(),
                                                                  StableDiffusion3())}
KNOWN_BASES: dict[str, BaseModelInfo] = {name: info for family in FAMILIES.values()
                                         for name, info in family.bases.items()}
# Each family by the pipeline class it is recognised by.
_BY_PIPELINE = {family.pipeline_class_name: family for family in FAMILIES.values()}


def family_titles() -> str:
    """Every family's name as people write it, for help and messages: "FLUX.1, FLUX.2 [klein], ..."."""
    return ", ".join(family.title for family in FAMILIES.values())


def folder_family(folder: Path) -> Family:
    """The family of a local diffusers folder, from the pipeline class its model_index.json names."""
    index = Path(folder) / "model_index.json"
    try:
        pipeline = json.loads(index.read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError) as error:
        raise LookalikeError(f"cannot read {index}: {error}") from None
    if pipeline not in _BY_PIPELINE:
        raise LookalikeError(f"{folder}: its model_index.json names the pipeline {pipeline!r}; lookalike trains "
                             f"{', '.join(_BY_PIPELINE)}")
    return _BY_PIPELINE[pipeline]


def denoiser_family(denoiser) -> Family:
    """The family of a denoiser model (transformer or UNet), by its class (or the class it was made from: sharding
    subclasses it), and by its config where families share a class (SD 1.x and SDXL: UNet2DConditionModel)."""
    classes = {cls.__name__ for cls in type(denoiser).__mro__}
    for family in FAMILIES.values():
        if family.components[family.denoiser][1] in classes and family.owns(denoiser.config):
            return family
    raise LookalikeError(f"no model family has the denoiser class {type(denoiser).__name__}")


def pipeline_family(pipe) -> Family:
    """The family of a loaded pipeline, by its class."""
    name = type(pipe).__name__
    if name not in _BY_PIPELINE:
        raise LookalikeError(f"no model family has the pipeline class {name}")
    return _BY_PIPELINE[name]


def is_base(base: str) -> bool:
    """Whether `base` names a base whose family can be told: a known name, or a local diffusers folder."""
    return base in KNOWN_BASES or (Path(base) / "model_index.json").is_file()


def base_family(base: str) -> Family:
    """The family of a base: a known name's, or a local folder's (FLUX.1 for a folder not readable yet, so that
    loading it says what is wrong)."""
    if base in KNOWN_BASES:
        return FAMILIES[KNOWN_BASES[base].family]
    if not is_base(base):
        return FAMILIES["flux1"]
    return folder_family(Path(base))
