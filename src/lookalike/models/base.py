"""Base models: a known hub model of a family (FLUX.1-dev, Z-Image, ...), a local diffusers folder, or a tiny
model built offline.

Every base resolves to a local diffusers folder first (downloading from the hub where needed), and each
component is then loaded on its own, with its family's class, so that a stage loads only what it needs
(training with cached text embeddings never constructs the text encoders).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from pathlib import Path

from lookalike.errors import LookalikeError
from lookalike.models.families import FAMILIES, KNOWN_BASES, base_family, folder_family, is_base
from lookalike.models.families.interface import BaseModelInfo, TextEncoding
from lookalike.models.quantize import quantization_config

# Only the diffusers-format folders: FLUX repos also hold single-file checkpoints of the same weights.
_HUB_PATTERNS = ["model_index.json", "*/config.json", "*/*.safetensors", "*/*.safetensors.index.json",
                 "scheduler/*", "tokenizer/*", "tokenizer_2/*"]


def quiet_libraries() -> None:
    """Keep diffusers' and transformers' per-load progress bars and notices off the console: our own
    progress bars and one-line errors are what a user should read. Set before they are imported: some of their
    notices come at import time."""
    # torchao, when installed for a quantised base, registers its enums in a way torch now warns about.
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
    for variable in ("DIFFUSERS_VERBOSITY", "TRANSFORMERS_VERBOSITY"):
        os.environ.setdefault(variable, "error")
    import diffusers
    import transformers

    for library in (diffusers, transformers):
        library.utils.logging.set_verbosity_error()
        library.utils.logging.disable_progress_bar()


def base_info(base: str) -> BaseModelInfo:
    """A known base's facts; a local folder's, told by its family from its configs (no weights are read)."""
    if base in KNOWN_BASES:
        return KNOWN_BASES[base]
    return base_family(base).local_info(Path(base))


def drawing_base(config) -> str:
    """The base images are drawn with: [generate] base, else the one trained on."""
    return config.generate.base or config.model.base


def check_drawing_base(config) -> None:
    """Refuse a drawing base other than the trained one's family (its LoRAs would not load into it), before
    anything is loaded or downloaded."""
    base = drawing_base(config)
    if base == config.model.base:
        return
    if not is_base(base):
        raise LookalikeError(f"generate.base: {base!r} is neither a known model ({', '.join(KNOWN_BASES)}) nor a "
                             "local diffusers folder")
    drawing, trained = base_family(base), base_family(config.model.base)
    if drawing is not trained:
        raise LookalikeError(f"generate.base: {base} is a {drawing.name} base, and the LoRAs of model.base "
                             f"{config.model.base} are {trained.name}'s: draw with a base of that family")


def inference_steps(config) -> int:
    """[generate] num_inference_steps, else the drawing base's own (28 for FLUX.1-dev, 4 for schnell, 50 for
    Z-Image)."""
    return config.generate.num_inference_steps or base_info(drawing_base(config)).steps


def guidance_scales(config, base: str | None = None) -> list[float | None]:
    """The guidance scales images are made at: [generate] guidance_scales, else the base's own; [None] for a base
    that takes no guidance (schnell), whose images would be the same at every scale. `base`: the one drawing
    (default the drawing base; training samples and class images are drawn by the trained one)."""
    base = base or drawing_base(config)
    if not base_info(base).guidance:
        return [None]
    return list(config.generate.guidance_scales or [default_guidance(base)])


def default_guidance(base: str) -> float:
    """The guidance scale a base is drawn at when the study sets none: its model card's, else its pipeline's."""
    info = base_info(base)
    return info.guidance_scale if info.guidance_scale is not None else base_family(base).pipeline_guidance


def training_resolution(config) -> int:
    """The side a run trains at: [train] resolution, else [data] resolution or the base's own size where that is
    smaller (SD 1.x: 512)."""
    native = base_info(config.model.base).resolution
    return config.train.resolution or min(config.data.resolution, native or config.data.resolution)


def training_sides(config) -> list[int]:
    """Every side a run trains at: its resolution, then train.extra_resolutions (multi-resolution training)."""
    return list(dict.fromkeys([training_resolution(config), *config.train.extra_resolutions]))


def max_sequence_length(model) -> int:
    """Text tokens per prompt: [model] max_sequence_length, else the base's own default."""
    return model.max_sequence_length or base_info(model.base).max_sequence_length


def text_encoding(model) -> TextEncoding:
    """How prompts are encoded for training and drawing alike: [model] max_sequence_length and
    text_encoder_out_layers, else the base's own."""
    layers = model.text_encoder_out_layers
    if layers is not None:
        family = base_family(model.base)
        if family.text_layers is None:
            raise LookalikeError(f"model.text_encoder_out_layers: {model.base} is a {family.name} base, whose pipeline "
                                 "stacks no text-encoder layers (only FLUX.2's does): leave it unset")
        if len(layers) != len(family.text_layers) or min(layers) < 0:
            raise LookalikeError(f"model.text_encoder_out_layers: {list(layers)} must be {len(family.text_layers)} "
                                 f"layer numbers, 0 or more, as {family.name}'s transformer reads "
                                 f"{len(family.text_layers)} (its pipeline's: {list(family.text_layers)})")
    return TextEncoding(max_sequence_length(model), None if layers is None else tuple(layers))


def _download(repo: str, revision: str | None, ignore: list[str]) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(repo, revision=revision, allow_patterns=_HUB_PATTERNS, ignore_patterns=ignore))
    except GatedRepoError:
        raise LookalikeError(
            f"{repo} is gated: accept its licence at https://huggingface.co/{repo} while logged in, then run "
            "`hf auth login` (or set HF_TOKEN) with a token of that account"
        ) from None
    except RepositoryNotFoundError:
        raise LookalikeError(
            f"{repo} was not found or needs a token: run `hf auth login` (or set HF_TOKEN); for a gated model, "
            f"accept its licence at https://huggingface.co/{repo} first"
        ) from None
    except LocalEntryNotFoundError:
        raise LookalikeError(
            f"{repo} is not in the local Hugging Face cache and the hub cannot be reached (offline?): download it "
            f"once with network access (`hf download {repo}`), or set model.base to a local diffusers folder"
        ) from None


def resolve_base(base: str, revision: str | None = None, without_weights: tuple[str, ...] = ()) -> Path:
    """The local diffusers folder of a base model, downloading or building it where needed; a download leaves out
    the weights of the components `without_weights` names (a single-file checkpoint's replace them)."""
    info = KNOWN_BASES.get(base)
    if info is not None:
        family = FAMILIES[info.family]
        ignore = family.hub_ignore + [f"{component}/*.safetensors" for component in without_weights]
        return _download(info.repo, revision, ignore) if info.repo is not None else family.ensure_tiny(base)
    folder = Path(base)
    if not (folder / "model_index.json").is_file():
        raise LookalikeError(
            f"model.base: {base!r} is neither a known model ({', '.join(KNOWN_BASES)}) "
            "nor a diffusers folder with a model_index.json"
        )
    folder_family(folder)  # a pipeline lookalike cannot train is refused here, by name
    return folder


def component_fingerprint(folder: Path, component: str) -> str:
    """A short hash naming a component's configuration, for cache keys (cheap: reads config files only). A
    component linked from another folder (a single-file checkpoint's base, models/checkpoint.py) is named as there,
    so the two share its cache."""
    digest = hashlib.sha256(str((folder / component).resolve()).encode())
    for config_file in sorted((folder / component).glob("*.json")):
        digest.update(config_file.read_bytes())
    return digest.hexdigest()[:16]


def weight_bytes(folder: Path, component: str, dtype) -> int:
    """The memory a component's weights take at `dtype`, counted from its safetensors headers (no weights read)."""
    import math

    import torch
    from safetensors import safe_open

    values = 0
    for weights in (Path(folder) / component).glob("*.safetensors"):
        with safe_open(str(weights), framework="pt") as handle:
            values += sum(math.prod(handle.get_slice(name).get_shape()) for name in handle.keys())
    return values * torch.finfo(dtype).bits // 8


def pick_device():
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def inference_dtype(device):
    """bfloat16 on GPUs that have it, full precision elsewhere (the CPU is slow and inexact in half precision)."""
    import torch

    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def load_component(folder: Path, component: str, dtype=None, quantization: str = "none"):
    """Load one component of a base's folder (transformer, vae, text_encoder, ...) with its family's class; the
    transformer's linear weights quantised as they load when `quantization` says so (models/quantize.py)."""
    family = folder_family(folder)
    with _naming_failures(folder, component):
        loader = family.component_class(component)
        if component.startswith("tokenizer") or component in ("scheduler", "processor"):  # no weights
            return loader.from_pretrained(folder, subfolder=component)
        kwargs = {"dtype": dtype} if dtype is not None else {}
        if quantization != "none":
            kwargs["quantization_config"] = quantization_config(quantization, dtype)
        model = loader.from_pretrained(folder, subfolder=component, **kwargs)
    if component == family.denoiser:
        family.adjust_denoiser(model)
    return model


def load_pipeline(folder: Path, dtype=None, **components):
    """The family's pipeline from a folder; components given (e.g. transformer=..., text_encoder=None) replace its
    own."""
    family = folder_family(folder)
    kwargs = {"dtype": dtype} if dtype is not None else {}
    with _naming_failures(folder, "pipeline"):
        pipe = family.pipeline_class().from_pretrained(folder, **{**family.pipeline_overrides(), **components},
                                                       **kwargs)
    family.adjust_pipeline(pipe)
    if getattr(pipe, family.denoiser, None) is not None:
        family.adjust_denoiser(getattr(pipe, family.denoiser))
    return pipe


@contextlib.contextmanager
def _naming_failures(folder: Path, component: str):
    """A base folder that fails to load (a missing or broken file, a config of the wrong shape) is one error
    naming the folder and the component, not a library's traceback."""
    from safetensors import SafetensorError

    try:
        yield
    except LookalikeError:
        raise
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise LookalikeError(f"cannot load the {component} of the base model in {folder}: {first}") from None
