"""Starting a run from an existing LoRA (train.init_lora) instead of a fresh one.

The file's weight change on each layer, B A times its scale alpha / r, is what the run starts from, whatever the
run's own rank and alpha: its A matrix fills the first rows of the run's, its B matrix (rescaled to the run's alpha
/ rank) the first columns of the run's. A higher run rank keeps its other directions as peft made them, A random
and B zero, so they change nothing until they learn. Layers the run adapts and the file does not start fresh
(B zero) in the same way.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from lookalike.errors import LookalikeError
from lookalike.models.families import base_family, is_base
from lookalike.models.lora import denoiser_of, modules_of, read_lora, text_encoders_of, text_layer_in_model
from lookalike.workspace import RunPaths, atomic_path


def keep_copy(source: Path, run: RunPaths) -> Path:
    """Copy the file a run starts from into its folder (durably), so the run repeats from its own folder."""
    if not Path(source).is_file():
        raise LookalikeError(f"train.init_lora: {source} is not a file")
    with atomic_path(run.init_lora) as tmp:
        shutil.copyfile(source, tmp)
    return run.init_lora


def read_start(path: Path, shown_as: Path, rank: int, base: str, trains_text_encoders: bool) -> tuple[dict, dict]:
    """(tensors, adapter config) of the LoRA file `path` a run of `base` starts from, once what the file alone can
    tell is known to fit the run: its layout, its base's family (as its header names it), its denoiser, its rank, and
    text encoders' layers only where the run trains them. Errors name it as `shown_as` (the file the config names).
    Cheap: a run checks it before anything slow is made."""
    try:
        tensors, adapter, info = read_lora(path)
    except LookalikeError as error:
        raise LookalikeError(f"train.init_lora: {str(error).replace(str(path), str(shown_as))}") from None
    recorded = info.get("base_model")
    if recorded and recorded != base and is_base(recorded):
        theirs, ours = base_family(recorded).name, base_family(base).name
        if theirs != ours:
            raise LookalikeError(f"train.init_lora: {shown_as} is a LoRA of {recorded} (family {theirs}), and this "
                                 f"run trains {base} (family {ours})")
    denoiser = base_family(base).denoiser
    if denoiser_of(tensors) != denoiser:
        raise LookalikeError(f"train.init_lora: {shown_as} is a LoRA of a {denoiser_of(tensors)}, and this base's "
                             f"denoiser is a {denoiser}")
    if text_encoders_of(tensors) and not trains_text_encoders:
        raise LookalikeError(f"train.init_lora: {shown_as} holds a LoRA of the {text_encoders_of(tensors)[0]} too, "
                             "which this run does not train: set train.train_text_encoder = true")
    file_rank = max(tensors[key].shape[0] for key in tensors if ".lora_A." in key)
    if file_rank > rank:
        raise LookalikeError(f"train.init_lora: {shown_as} has rank {file_rank}, more than this run's train.rank = "
                             f"{rank}: set train.rank to {file_rank} or more")
    return tensors, adapter


def start_from(denoiser, denoiser_name: str, start: tuple[dict, dict], shown_as: Path, rank: int, alpha: float,
               text_encoders: dict | None = None) -> int:
    """Set the adapter "default" of `denoiser` (just made by add_lora, float32), and of each text encoder the run
    trains (`text_encoders`: component -> model), to start from `start`, what read_start read of the file the
    config names `shown_as`. Returns how many layers it set."""
    tensors, adapter = start
    models = {denoiser_name: denoiser, **(text_encoders or {})}
    everything = {denoiser_name: modules_of(tensors, denoiser_name)}
    everything.update({encoder: {text_layer_in_model(model, name): weights for name, weights in
                                 modules_of(tensors, encoder).items()} for encoder, model in models.items()
                       if encoder != denoiser_name})
    ratio = (adapter["lora_alpha"] / adapter["r"]) / (alpha / rank)  # the file's scale over the run's
    for component, modules in everything.items():
        _set_layers(models[component], modules, ratio, shown_as)
    return sum(len(modules) for modules in everything.values())


def _set_layers(model, modules: dict, ratio: float, shown_as: Path) -> None:
    """Write each module's (A, B) from the file into the same layer's adapter of `model`, B times `ratio`."""
    layers = {name: module for name, module in model.named_modules()
              if hasattr(module, "lora_A") and "default" in module.lora_A}
    foreign = sorted(modules.keys() - layers.keys())
    if foreign:
        raise LookalikeError(
            f"train.init_lora: {shown_as} adapts {len(foreign)} layers this run does not (first: {foreign[0]}): set "
            "train.target_modules to a preset that adapts them ('attention+mlp' adapts the most), or this is a "
            "LoRA of another base")
    with torch.no_grad():
        for name, (down, up) in modules.items():
            layer = layers[name]
            a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            if (down.shape[1], up.shape[0]) != (a.shape[1], b.shape[0]):
                raise LookalikeError(
                    f"train.init_lora: {shown_as} does not fit this base: its layer {name} maps {down.shape[1]} to "
                    f"{up.shape[0]} features, this base's {a.shape[1]} to {b.shape[0]} (a LoRA of another base)")
            a[:down.shape[0]] = down.to(a.device, a.dtype)
            b[:, :up.shape[1]] = (up.double() * ratio).to(b.device, b.dtype)
