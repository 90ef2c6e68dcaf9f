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
from lookalike.models.families import KNOWN_BASES, base_family, denoiser_family, is_base
from lookalike.workspace import atomic_path

METADATA_PREFIX = "lookalike."
DENOISERS = ("transformer", "unet")  # the pipeline components a LoRA file's keys may start with
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")  # and those of a run that trains its text encoders


def add_lora(transformer, rank: int, alpha: float, target: str, dropout: float = 0.0, adapter: str = "lora",
             lokr_factor: int = -1, layer_filter: str | None = None) -> None:
    """Add a trainable adapter to the (frozen) denoiser, on the layers its family's preset `target` names
    (train.target_modules), of those only the ones whose names `layer_filter` matches (train.layer_filter):
    `adapter` lora, dora or lokr (train.adapter; `lokr_factor`: train.lokr_factor)."""
    import re

    import torch
    from peft import LoKrConfig, LoraConfig

    preset = denoiser_family(transformer).target_modules[target]
    # peft adapts the linear layers whose whole name the pattern matches; a filter is a lookahead, anywhere in it.
    targets = preset if layer_filter is None else rf"(?=.*?(?:{layer_filter}))(?:{preset})"
    adapted = [module for name, module in transformer.named_modules()
               if isinstance(module, torch.nn.Linear) and re.fullmatch(targets, name)]
    if layer_filter is not None and not adapted:
        raise LookalikeError(f"train.layer_filter = {layer_filter!r} matches none of the layers train.target_modules "
                             f"= {target!r} adapts on this base")
    # A rank above every adapted layer's narrower side adds parameters that cannot change anything: a user's slip.
    # (Above some layers' only is usual: Krea 2's reference set adapts a 12-to-1 projection at any rank.) A LoKr's
    # rank only says when its factor is a full matrix.
    widths = [min(module.in_features, module.out_features) for module in adapted]
    if adapter != "lokr" and widths and rank > max(widths):
        raise LookalikeError(f"train.rank = {rank} is more than any adapted layer's width: a LoRA's rank can be at "
                             f"most {max(widths)} on this base")
    transformer.requires_grad_(False)
    if adapter == "lokr":
        # LyCORIS's initialisation (w2 zero, w1 random), as kohya's LyCORIS and SimpleTuner start a LoKr.
        config = LoKrConfig(r=rank, alpha=alpha, target_modules=targets, decompose_factor=lokr_factor,
                            init_weights="lycoris")
    else:
        config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, init_lora_weights="gaussian",
                            target_modules=targets, use_dora=adapter == "dora")
    transformer.add_adapter(config)


def share_lora_inputs(model) -> int:
    """Let every LoRA layer of `model` take its input as it comes, where peft would cast it to the LoRA's float32
    first. Under mixed-precision autocast the matmul casts it back to bf16 (or fp16), so the values are the same, but
    each layer kept a copy of its own for the backward pass; now the layers that read one input (q, k and v) keep it
    once. For the caller to use only with a plain LoRA without dropout (dropout on the float32 copy rounds
    otherwise), and only under autocast (without it, a float32 LoRA needs the cast). Returns the layers changed."""
    from peft.tuners.lora import LoraLayer

    layers = [module for module in model.modules() if isinstance(module, LoraLayer)]
    for layer in layers:
        layer.cast_input_dtype_enabled = False
    return len(layers)


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


LOKR = ".lokr_"  # in every LoKr key: <module>.lokr_w1, .lokr_w2_a, ...


def alpha_field(peft_config) -> str:
    """The name of a peft adapter config's alpha: LoRA's lora_alpha, LoKr's alpha."""
    return "lora_alpha" if hasattr(peft_config, "lora_alpha") else "alpha"


def is_lokr(keys) -> bool:
    """Whether a file's tensors (or keys) are a LoKr's (train.adapter = 'lokr')."""
    return any(LOKR in key for key in keys)


def scaled(key: str) -> bool:
    """Whether a tensor is the factor an adapter's scale is folded into, one its change is linear in: a LoRA's B
    matrix, or a LoKr's w1 (whole, or the first half of a split one)."""
    return ".lora_B." in key or key.endswith((".lokr_w1", ".lokr_w1_a"))


def save_lora(path: Path, tensors: dict[str, Any], peft_config, info: dict[str, Any], dtype=None,
              text_encoder_configs: dict[str, Any] | None = None) -> None:
    """Write a LoRA (or LoKr) file atomically: tensors, diffusers' adapter metadata, our own `lookalike.*` facts,
    and the facts other tools read (ss_network_dim, ss_network_alpha, ss_base_model_version, ss_sd_model_name,
    modelspec.architecture). `text_encoder_configs`: component -> peft config of each text encoder the tensors hold
    a LoRA of (of the same rank and alpha as the denoiser's).

    The scale alpha / rank is folded into the B matrices (a LoKr's w1) and the file says alpha = rank, so that
    every reader applies the adapter at its trained strength: ComfyUI and kohya's converters never read peft's
    metadata, and would apply a file with alpha != rank at rank / alpha times its strength (ComfyUI applies a LoKr
    without alpha tensors at scale 1). `dtype`: the tensors' type in the file (default: each their own); the scale
    is folded in float32, before any cast."""
    from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY
    from safetensors.torch import save_file

    alpha = alpha_field(peft_config)
    rank, scale = peft_config.r, getattr(peft_config, alpha) / peft_config.r

    def written(key: str, value):
        folded = value.float() * scale if scale != 1 and scaled(key) else value
        return folded.to(dtype or value.dtype)

    configs = {denoiser_of(tensors): peft_config, **(text_encoder_configs or {})}
    if any((config.r, getattr(config, alpha_field(config))) != (rank, getattr(peft_config, alpha))
           for config in configs.values()):
        raise ValueError("every component's LoRA must have the denoiser's rank and alpha: one scale is folded in")
    tensors = {key: written(key, value) for key, value in tensors.items()}
    check_finite(tensors, path)
    info = {**info, "rank": rank, "alpha": rank}  # true of the layers written
    adapter = {f"{component}.{k}": v for component, config in configs.items()
               for k, v in (dataclasses.replace(config, **{alpha_field(config): rank}) if scale != 1 else config
                            ).to_dict().items()}
    metadata = {"format": "pt", LORA_ADAPTER_METADATA_KEY: json.dumps(adapter, default=_jsonable, sort_keys=True),
                **file_metadata(rank, info, peft_config)}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def file_metadata(rank: int, info: dict[str, Any], peft_config=None) -> dict[str, str]:
    """The header facts of a LoRA file whose scale is 1 (alpha = rank): kohya's and the sites' `ss_*` and
    `modelspec.*`, and our own `lookalike.*`. A LoKr (`peft_config` a LoKrConfig) is named as kohya's LyCORIS
    names one (ss_network_module, and its algorithm and factor in ss_network_args)."""
    base = info.get("base_model") or ""
    family = base_family(base)  # a file that names no base: FLUX.1, as lookalike's LoRAs were
    metadata = {"ss_network_dim": str(rank), "ss_network_alpha": str(rank)}
    if peft_config is not None and alpha_field(peft_config) == "alpha":
        metadata["ss_network_module"] = "lycoris.kohya"
        metadata["ss_network_args"] = json.dumps({"algo": "lokr", "factor": str(peft_config.decompose_factor)})
    if family.kohya_base_version is not None:
        metadata["ss_base_model_version"] = family.kohya_base_version
    # The model it was trained on, as kohya names it and sharing sites show it: a fine-tune's file, else the base's
    # hub repository or folder.
    if base:
        known = KNOWN_BASES.get(base)
        metadata["ss_sd_model_name"] = info.get("checkpoint") or (known.repo if known and known.repo else
                                                                  Path(base).name)
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
    if not any("lora" in key or LOKR in key for key in keys):
        raise LookalikeError(f"{path}: holds no LoRA weights (no key contains 'lora' or '{LOKR}')")
    return metadata


def check_finite(tensors: dict[str, Any], path: Path) -> None:
    """Refuse LoRA weights that hold NaN or infinite values (a merge at huge weights, a cast that overflows): every
    image drawn with them would be noise, labelled with the file."""
    import torch

    bad = next((key for key, value in tensors.items() if not torch.isfinite(value).all()), None)
    if bad is not None:
        raise LookalikeError(f"{path}: its LoRA weights would hold NaN or infinite values ({bad}); nothing was "
                             "written or drawn")


def lookalike_metadata(metadata: dict[str, str]) -> dict[str, str]:
    """Our own facts from a LoRA file's header (base model, trigger word, rank, alpha, ...)."""
    return {k.removeprefix(METADATA_PREFIX): v for k, v in metadata.items() if k.startswith(METADATA_PREFIX)}


def read_lora(path: Path, lokr: bool = False) -> tuple[dict[str, Any], dict[str, Any], dict[str, str]]:
    """(tensors, adapter config, lookalike facts) of a checked LoRA file in diffusers' layout; with `lokr`, a
    LoKr file is read too (its config's peft_type is then LOKR). The adapter config is the peft config diffusers
    stored (rank `r`, `lora_alpha` or a LoKr's `alpha`, ...); a file without one gets rank and alpha from its
    tensors, as diffusers itself assumes (alpha = rank)."""
    from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY
    from safetensors.torch import load_file

    metadata = check_lora_file(path)
    tensors = load_file(str(path))
    if any(key.endswith(".lora_magnitude_vector") for key in tensors):
        raise LookalikeError(f"{path}: a DoRA adapter, whose weight change is not a low-rank product: merge, resize "
                             "and export take plain LoRAs only (train.adapter = 'lora'); generate and the demo load it")
    kronecker = is_lokr(tensors)
    if kronecker and not lokr:
        raise LookalikeError(f"{path}: a LoKr adapter, whose weight change is a Kronecker product, not a low-rank "
                             "one: merge, resize and init_lora take plain LoRAs only (train.adapter = 'lora'); "
                             "generate, export and the demo take it")
    denoiser = denoiser_of(tensors)
    if denoiser not in DENOISERS or not all(component_of(key) in (denoiser, *TEXT_ENCODERS) and
                                            (".lora_A." in key or ".lora_B." in key or LOKR in key) for key in tensors):
        raise LookalikeError(f"{path}: not a LoRA in diffusers' layout (keys transformer.<module>.lora_A/lora_B.weight"
                             ", or unet.<module>..., and text_encoder.<module>... for its text encoders)")
    try:
        adapter = json.loads(metadata.get(LORA_ADAPTER_METADATA_KEY, "{}"))
    except ValueError:
        adapter = None
    if not isinstance(adapter, dict):
        raise LookalikeError(f"{path}: its header's {LORA_ADAPTER_METADATA_KEY} is not a JSON object of LoRA "
                             "settings")
    ranks = _checked_lokr_ranks(path, tensors) if kronecker else \
        [down.shape[0] for down, _ in _checked_modules(path, tensors).values()]
    if not ranks:
        raise LookalikeError(f"{path}: holds a LoRA of text encoders only, none of a transformer or UNet")
    alpha = "alpha" if kronecker else "lora_alpha"
    config = {k.removeprefix(f"{denoiser}."): v for k, v in adapter.items() if component_of(k) not in TEXT_ENCODERS}
    if "r" not in config:
        config = {"r": ranks[0], alpha: ranks[0]}
    for key in ("r", alpha):
        value = config.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise LookalikeError(f"{path}: its LoRA setting {key} is {value!r}, not a positive number")
    if kronecker:
        config["peft_type"] = "LOKR"
    return tensors, config, lookalike_metadata(metadata)


def adapter_config(settings: dict[str, Any]):
    """The peft config (LoraConfig, or a LoKr's LoKrConfig) of a file's adapter settings, as read_lora gives them."""
    from peft import LoKrConfig, LoraConfig

    kind = LoKrConfig if settings.get("peft_type") == "LOKR" else LoraConfig
    return kind(**{k: v for k, v in settings.items() if k in kind.__dataclass_fields__ and k != "peft_type"})


# A LoKr module's tensors: each factor whole, or split into two matrices (LyCORIS's names).
LOKR_PARTS = {"w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b"}


def _checked_lokr_ranks(path: Path, tensors: dict[str, Any]) -> list[int]:
    """The rank of each of a LoKr's modules (that of its split w2, or of its whole w2's larger side), once every
    module is known to be whole: w1 and w2, each one matrix or two that multiply, 2-D, with finite values."""
    import torch

    modules: dict[str, dict[str, Any]] = {}
    for key, value in tensors.items():
        if LOKR not in key:
            raise LookalikeError(f"{path}: holds LoKr tensors and others ({key}) together: one adapter per file")
        name, _, part = key.rpartition(LOKR)
        modules.setdefault(name, {})[part] = value
    ranks = []
    for name, parts in sorted(modules.items()):
        unknown = parts.keys() - LOKR_PARTS
        if unknown:
            raise LookalikeError(f"{path}: module {name} holds lokr_{sorted(unknown)[0]}, which lookalike does not "
                                 "read (a LoKr of linear layers has w1 and w2, each whole or split in _a and _b)")
        for factor in ("w1", "w2"):
            a, b = parts.get(f"{factor}_a"), parts.get(f"{factor}_b")
            if factor in parts and a is None and b is None:
                matrices = [parts[factor]]
            elif factor not in parts and a is not None and b is not None:
                matrices = [a, b]
            else:
                raise LookalikeError(f"{path}: module {name} needs its lokr_{factor} once: whole, or as "
                                     f"lokr_{factor}_a and lokr_{factor}_b")
            if any(m.ndim != 2 for m in matrices) or (len(matrices) == 2 and a.shape[1] != b.shape[0]):
                raise LookalikeError(f"{path}: module {name}'s lokr_{factor} is not a matrix, or two that multiply")
        if not all(torch.isfinite(t).all() for t in parts.values()):
            raise LookalikeError(f"{path}: module {name}'s LoKr weights hold NaN or infinite values")
        if component_of(name) not in TEXT_ENCODERS:
            ranks.append(parts["w2_a"].shape[1] if "w2_a" in parts else max(parts["w2"].shape))
    return ranks


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


def check_lora_base(path: Path, base: str) -> None:
    """Refuse a LoRA file whose header names a base of another family than `base`'s (a file that names none, or a
    base that cannot be told, is checked when it loads: load_lora_into)."""
    trained_on = lookalike_metadata(check_lora_file(path)).get("base_model")
    if trained_on and is_base(trained_on) and base_family(trained_on).name != base_family(base).name:
        raise LookalikeError(f"{path}: a LoRA of {trained_on} ({base_family(trained_on).name}), which {base} "
                             f"({base_family(base).name}) cannot load: use a LoRA of a {base_family(base).name} base")


def load_lora_into(pipe, path: Path, adapter_name: str = "default") -> dict[str, str]:
    """Load a checked LoRA (or LoKr) file into a pipeline with diffusers' own loader; return its metadata. A LoKr
    loads through its denoiser's loader (load_lora_adapter), which every pipeline's load_lora_weights calls but
    only some (Z-Image's, FLUX.2's) let a LoKr reach. A file none of whose layers the pipeline has is refused:
    diffusers would only warn, and images would be labelled with a LoRA they never had."""
    from safetensors import safe_open

    metadata = check_lora_file(path)
    path = Path(path)
    with safe_open(str(path), framework="pt") as handle:
        keys = list(handle.keys())
        check_finite({key: handle.get_tensor(key) for key in keys}, path)
    denoiser = denoiser_of(keys)
    if not is_lokr(keys):
        pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=adapter_name,
                               use_safetensors=True)
    elif hasattr(pipe, denoiser):  # a LoKr of a UNet loads nothing into a transformer's pipeline, and vice versa
        getattr(pipe, denoiser).load_lora_adapter(str(path.parent), weight_name=path.name, prefix=denoiser,
                                                  adapter_name=adapter_name, use_safetensors=True)
    if not any(adapter_name in names for names in pipe.get_list_adapters().values()):
        raise LookalikeError(f"{path}: none of its layers is one of this base's ({type(pipe).__name__}): a LoRA of "
                             "another base?")
    return lookalike_metadata(metadata)
