"""LoRA adapters of a base's denoiser (the transformer, or an SD UNet), and of its text encoders where a run trains
them (train.train_text_encoder, SD 1.x and SDXL): how they are added, saved and checked on loading (which layers:
the family's presets, models/families/).

Saved files use diffusers' own layout (keys `<component>.<module>.lora_A.weight`, `transformer.` or `unet.`, and
`text_encoder.` or `text_encoder_2.`; each component's peft config under the `lora_adapter_metadata` header), so
the family pipeline's `load_lora_weights` loads them unchanged, alpha included.
Only safetensors files are ever read: a pickle can run code on loading.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from lookalike.errors import LookalikeError
from lookalike.models.families import base_family, denoiser_family
from lookalike.workspace import atomic_path

METADATA_PREFIX = "lookalike."
DENOISERS = ("transformer", "unet")  # the pipeline components a LoRA file's keys may start with
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")  # and those of a run that trains its text encoders


def add_lora(transformer, rank: int, alpha: float, target: str, dropout: float = 0.0, dora: bool = False) -> None:
    """Add a trainable LoRA adapter to the (frozen) denoiser, on the layers its family's preset `target` names
    (train.target_modules); `dora`: a DoRA adapter (train.adapter)."""
    import re

    import torch
    from peft import LoraConfig

    targets = denoiser_family(transformer).target_modules[target]
    # A rank above every adapted layer's narrower side adds parameters that cannot change anything: a user's slip.
    # (Above some layers' only is usual: Krea 2's reference set adapts a 12-to-1 projection at any rank.)
    widths = [min(module.in_features, module.out_features) for name, module in transformer.named_modules()
              if isinstance(module, torch.nn.Linear) and re.fullmatch(rf".*(?:{targets})", name)]
    if widths and rank > max(widths):
        raise LookalikeError(f"train.rank = {rank} is more than any adapted layer's width: a LoRA's rank can be at "
                             f"most {max(widths)} on this base")
    transformer.requires_grad_(False)
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        init_lora_weights="gaussian",
        target_modules=targets,
        use_dora=dora,
    )
    transformer.add_adapter(config)


def full_tensor(tensor):
    """A tensor sharded across processes (train.shard) gathered whole, a collective step; any other as it is."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def lora_state_dict(denoiser) -> dict[str, Any]:
    """The adapter's tensors with diffusers' key names (prefix: the family's denoiser, `transformer.` or
    `unet.`): a copy, whole and on the CPU, which later steps leave as it is (of a sharded transformer every
    process must call it)."""
    from peft.utils import get_peft_model_state_dict

    prefix = denoiser_family(denoiser).denoiser
    return {
        f"{prefix}.{key}": full_tensor(tensor.detach()).to("cpu", copy=True).contiguous()
        for key, tensor in get_peft_model_state_dict(denoiser).items()
    }


def component_of(key: str) -> str:
    return key.split(".", 1)[0]


def denoiser_of(tensors: dict[str, Any]) -> str:
    """The denoiser a LoRA's keys (diffusers' layout) name: transformer or unet (the first component that is not a
    text encoder)."""
    return next((component_of(key) for key in tensors if component_of(key) not in TEXT_ENCODERS), DENOISERS[0])


def save_lora(path: Path, tensors: dict[str, Any], peft_config, info: dict[str, Any], dtype=None,
              text_encoder_configs: dict[str, Any] | None = None) -> None:
    """Write a LoRA file atomically: tensors, diffusers' adapter metadata, our own `lookalike.*` facts, and the
    facts other tools read (ss_network_dim, ss_network_alpha, ss_base_model_version, modelspec.architecture).
    `text_encoder_configs`: component -> peft config of each text encoder the tensors hold a LoRA of (of the same
    rank and alpha as the denoiser's).

    The scale alpha / rank is folded into the B matrices and the file says alpha = rank, so that every reader
    applies the LoRA at its trained strength: ComfyUI and kohya's converters never read peft's metadata, and
    would apply a file with alpha != rank at rank / alpha times its strength. `dtype`: the tensors' type in the
    file (default: each their own); the scale is folded in float32, before any cast."""
    from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY
    from safetensors.torch import save_file

    rank, scale = peft_config.r, peft_config.lora_alpha / peft_config.r

    def written(key: str, value):
        folded = value.float() * scale if scale != 1 and ".lora_B." in key else value
        return folded.to(dtype or value.dtype)

    configs = {denoiser_of(tensors): peft_config, **(text_encoder_configs or {})}
    if any((config.r, config.lora_alpha) != (rank, peft_config.lora_alpha) for config in configs.values()):
        raise ValueError("every component's LoRA must have the denoiser's rank and alpha: one scale is folded in")
    tensors = {key: written(key, value) for key, value in tensors.items()}
    info = {**info, "rank": rank, "alpha": rank}  # true of the layers written
    adapter = {f"{component}.{k}": v for component, config in configs.items()
               for k, v in (dataclasses.replace(config, lora_alpha=rank) if scale != 1 else config).to_dict().items()}
    metadata = {"format": "pt", LORA_ADAPTER_METADATA_KEY: json.dumps(adapter, default=_jsonable, sort_keys=True),
                **file_metadata(rank, info)}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def file_metadata(rank: int, info: dict[str, Any]) -> dict[str, str]:
    """The header facts of a LoRA file whose scale is 1 (alpha = rank): kohya's and the sites' `ss_*` and
    `modelspec.*`, and our own `lookalike.*`."""
    base = info.get("base_model") or ""
    family = base_family(base)  # a file that names no base: FLUX.1, as lookalike's LoRAs were
    metadata = {"ss_network_dim": str(rank), "ss_network_alpha": str(rank)}
    if family.kohya_base_version is not None:
        metadata["ss_base_model_version"] = family.kohya_base_version
    if base in family.modelspec_architectures:
        metadata["modelspec.architecture"] = family.modelspec_architectures[base]
    metadata.update({METADATA_PREFIX + key: str(value) for key, value in info.items()})
    return metadata


def _jsonable(value: Any) -> Any:
    return sorted(value) if isinstance(value, set) else str(value)


def check_lora_file(path: Path) -> dict[str, str]:
    """Refuse anything but a readable safetensors LoRA file; return its header metadata."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise LookalikeError(f"LoRA file not found: {path}")
    if path.suffix != ".safetensors":
        raise LookalikeError(f"{path}: only .safetensors LoRA files are loaded (a pickled file can run code)")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            keys = list(handle.keys())
    except (SafetensorError, OSError, ValueError) as error:
        raise LookalikeError(f"{path}: not a valid safetensors file ({error})") from None
    if not any("lora" in key for key in keys):
        raise LookalikeError(f"{path}: holds no LoRA weights (no key contains 'lora')")
    return metadata


def lookalike_metadata(metadata: dict[str, str]) -> dict[str, str]:
    """Our own facts from a LoRA file's header (base model, trigger word, rank, alpha, ...)."""
    return {k.removeprefix(METADATA_PREFIX): v for k, v in metadata.items() if k.startswith(METADATA_PREFIX)}


def read_lora(path: Path) -> tuple[dict[str, Any], dict[str, Any], dict[str, str]]:
    """(tensors, adapter config, lookalike facts) of a checked LoRA file in diffusers' layout. The adapter
    config is the peft LoraConfig diffusers stored (rank `r`, `lora_alpha`, ...); a file without one gets
    rank and alpha from its tensors, as diffusers itself assumes (alpha = rank)."""
    from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY
    from safetensors.torch import load_file

    metadata = check_lora_file(path)
    tensors = load_file(str(path))
    if any(key.endswith(".lora_magnitude_vector") for key in tensors):
        raise LookalikeError(f"{path}: a DoRA adapter, whose weight change is not a low-rank product: merge and "
                             "export take plain LoRAs only (train.adapter = 'lora'); generate and the demo load it")
    denoiser = denoiser_of(tensors)
    if denoiser not in DENOISERS or not all(component_of(key) in (denoiser, *TEXT_ENCODERS) and
                                            (".lora_A." in key or ".lora_B." in key) for key in tensors):
        raise LookalikeError(f"{path}: not a LoRA in diffusers' layout (keys transformer.<module>.lora_A/lora_B.weight"
                             ", or unet.<module>..., and text_encoder.<module>... for its text encoders)")
    try:
        adapter = json.loads(metadata.get(LORA_ADAPTER_METADATA_KEY, "{}"))
    except ValueError:
        adapter = None
    if not isinstance(adapter, dict):
        raise LookalikeError(f"{path}: its header's {LORA_ADAPTER_METADATA_KEY} is not a JSON object of LoRA "
                             "settings")
    modules = _checked_modules(path, tensors)
    if not modules:
        raise LookalikeError(f"{path}: holds a LoRA of text encoders only, none of a transformer or UNet")
    config = {k.removeprefix(f"{denoiser}."): v for k, v in adapter.items() if component_of(k) not in TEXT_ENCODERS}
    if "r" not in config:
        rank = next(iter(modules.values()))[0].shape[0]
        config = {"r": rank, "lora_alpha": rank}
    for key in ("r", "lora_alpha"):
        value = config.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise LookalikeError(f"{path}: its LoRA setting {key} is {value!r}, not a positive number")
    return tensors, config, lookalike_metadata(metadata)


def _checked_modules(path: Path, tensors: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """modules_of(tensors), once every module (the text encoders' too) is known to be a whole LoRA: both matrices,
    2-D, of one rank of at least 1, with finite values. Anything else would fail deep inside merge or export, or
    poison the weights."""
    import torch

    for name in _module_names(tensors):
        down, up = (tensors.get(f"{name}.lora_{part}.weight") for part in "AB")
        if down is None or up is None:
            raise LookalikeError(f"{path}: module {name} lacks its lora_{'A' if down is None else 'B'} matrix")
        if down.ndim != 2 or up.ndim != 2 or down.shape[0] != up.shape[1] or down.shape[0] < 1:
            raise LookalikeError(f"{path}: module {name}'s LoRA matrices are {list(down.shape)} and "
                                 f"{list(up.shape)}, not rank x in and out x rank with a rank of 1 or more")
        if not (torch.isfinite(down).all() and torch.isfinite(up).all()):
            raise LookalikeError(f"{path}: module {name}'s LoRA weights hold NaN or infinite values")
    return modules_of(tensors)


def _module_names(tensors: dict[str, Any]) -> list[str]:
    """Every module's name with its component's prefix (unet.down_blocks..., text_encoder.text_model...)."""
    return sorted({key.rsplit(".lora_", 1)[0] for key in tensors})


def modules_of(tensors: dict[str, Any], component: str | None = None) -> dict[str, tuple[Any, Any]]:
    """module name (without its component's prefix) -> (lora_A, lora_B), of the denoiser or of `component`."""
    component = component or denoiser_of(tensors)
    return {name.removeprefix(f"{component}."): (tensors[f"{name}.lora_A.weight"], tensors[f"{name}.lora_B.weight"])
            for name in _module_names(tensors) if component_of(name) == component}


# transformers 5 names a CLIP text encoder's layers without its text_model wrapper (encoder.layers.0...); files
# keep the name every other tool reads (text_model.encoder.layers.0.self_attn.q_proj: ComfyUI, kohya, diffusers).
TEXT_MODEL = "text_model."


def text_layer_in_file(name: str) -> str:
    """A text encoder layer's name as LoRA files give it."""
    return name if name.startswith(TEXT_MODEL) else TEXT_MODEL + name


def text_layer_in_model(model, name: str) -> str:
    """A text encoder layer's name (as files give it) as `model` names it."""
    return name if hasattr(model, TEXT_MODEL.rstrip(".")) else name.removeprefix(TEXT_MODEL)


def text_encoder_configs(tensors: dict[str, Any], r: int, lora_alpha: float) -> dict[str, Any]:
    """The peft config of each text encoder the tensors hold a LoRA of (for save_lora), on the layers they adapt."""
    from peft import LoraConfig

    def layers(encoder: str) -> list[str]:
        return sorted({name.rsplit(".", 1)[-1] for name in modules_of(tensors, encoder)})

    return {encoder: LoraConfig(r=r, lora_alpha=lora_alpha, target_modules=layers(encoder))
            for encoder in text_encoders_of(tensors)}


def text_encoders_of(tensors: dict[str, Any]) -> list[str]:
    """The text encoders a LoRA's keys hold a LoRA of (a run that trained them), in the pipeline's order."""
    return [encoder for encoder in TEXT_ENCODERS if any(component_of(key) == encoder for key in tensors)]


def load_lora_into(pipe, path: Path, adapter_name: str = "default") -> dict[str, str]:
    """Load a checked LoRA file into a pipeline with diffusers' own loader; return its metadata."""
    metadata = check_lora_file(path)
    path = Path(path)
    pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=adapter_name, use_safetensors=True)
    return lookalike_metadata(metadata)
