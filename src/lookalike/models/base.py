"""Base models: FLUX.1-dev, FLUX.1-schnell, a local diffusers folder, or the tiny model built offline.

Every base resolves to a local diffusers folder first (downloading from the hub where needed), and each
component is then loaded on its own, so that a stage loads only what it needs (training with cached text
embeddings never constructs the text encoders).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from lookalike.errors import LookalikeError
from lookalike.models.quantize import quantization_config
from lookalike.models.tiny import ensure_tiny_model


@dataclass(frozen=True)
class BaseModelInfo:
    """What a base is made for: its generation defaults."""

    repo: str | None  # hub repository, None for models built or stored locally
    max_sequence_length: int  # T5 tokens per prompt
    steps: int  # inference steps: [generate] num_inference_steps when not set
    guidance: bool = True  # guidance-distilled (FLUX.1-dev): takes a guidance scale; schnell takes none


KNOWN_BASES = {
    "flux-dev": BaseModelInfo("black-forest-labs/FLUX.1-dev", 512, 28),
    "flux-schnell": BaseModelInfo("black-forest-labs/FLUX.1-schnell", 256, 4, guidance=False),
    "tiny": BaseModelInfo(None, 32, 28),
}
# A local folder: like FLUX.1-dev, or like schnell when its transformer has no guidance embedding.
LOCAL_FOLDER = BaseModelInfo(None, 512, 28)
LOCAL_WITHOUT_GUIDANCE = BaseModelInfo(None, 256, 4, guidance=False)
# FLUX.1's transformer (12B parameters), for estimates and benchmarks without its weights; schnell has no
# guidance embedding.
FLUX_TRANSFORMER = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                        num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                        guidance_embeds=True, axes_dims_rope=(16, 56, 56))

# FLUX.1's VAE (the 16-channel autoencoder), and its scheduler's settings, for benchmarks without weights.
FLUX_VAE = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
                up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[128, 256, 512, 512], layers_per_block=2,
                latent_channels=16, norm_num_groups=32, sample_size=1024, scaling_factor=0.3611, shift_factor=0.1159,
                use_quant_conv=False, use_post_quant_conv=False)
FLUX_SCHEDULER = dict(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096, max_shift=1.15,
                      num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True)

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
    """A known base's facts; a local folder's, told from its transformer's config (no weights are read)."""
    if base in KNOWN_BASES:
        return KNOWN_BASES[base]
    try:
        transformer = json.loads((Path(base) / "transformer" / "config.json").read_text())
    except (OSError, ValueError):
        return LOCAL_FOLDER  # not there yet (or not readable): loading it will say what is wrong
    return LOCAL_WITHOUT_GUIDANCE if transformer.get("guidance_embeds") is False else LOCAL_FOLDER


def inference_steps(config) -> int:
    """[generate] num_inference_steps, else the base's own (28 for FLUX.1-dev, 4 for schnell)."""
    return config.generate.num_inference_steps or base_info(config.model.base).steps


def guidance_scales(config) -> list[float | None]:
    """The guidance scales images are made at: [generate] guidance_scales, or [None] for a base that takes no
    guidance (schnell), whose images would be the same at every scale."""
    return list(config.generate.guidance_scales) if base_info(config.model.base).guidance else [None]


def max_sequence_length(model) -> int:
    """T5 tokens per prompt: [model] max_sequence_length, else the base's own default."""
    return model.max_sequence_length or base_info(model.base).max_sequence_length


def _download(repo: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(repo, revision=revision, allow_patterns=_HUB_PATTERNS))
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


def resolve_base(base: str, revision: str | None = None) -> Path:
    """The local diffusers folder of a base model, downloading or building it where needed."""
    if base == "tiny":
        return ensure_tiny_model()
    info = KNOWN_BASES.get(base)
    if info is not None and info.repo is not None:
        return _download(info.repo, revision)
    folder = Path(base)
    if not (folder / "model_index.json").is_file():
        raise LookalikeError(
            f"model.base: {base!r} is neither a known model ({', '.join(KNOWN_BASES)}) "
            "nor a diffusers folder with a model_index.json"
        )
    return folder


def component_fingerprint(folder: Path, component: str) -> str:
    """A short hash naming a component's configuration, for cache keys (cheap: reads config files only)."""
    digest = hashlib.sha256(str(folder.resolve()).encode())
    for config_file in sorted((folder / component).glob("*.json")):
        digest.update(config_file.read_bytes())
    return digest.hexdigest()[:16]


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


CLIP_TOKENS = 77  # FLUX's CLIP prompt length, whatever a tokenizer's config says (as diffusers' scripts do)


def load_component(folder: Path, component: str, dtype=None, quantization: str = "none"):
    """Load one component of a FLUX folder (transformer, vae, text_encoder, ...) with its own class; the
    transformer's linear weights quantised as they load when `quantization` says so (models/quantize.py)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel

    loaders = {
        "transformer": FluxTransformer2DModel,
        "vae": AutoencoderKL,
        "text_encoder": CLIPTextModel,
        "text_encoder_2": T5EncoderModel,
    }
    with _naming_failures(folder, component):
        if component in ("tokenizer", "tokenizer_2"):
            return AutoTokenizer.from_pretrained(folder, subfolder=component)
        if component == "scheduler":
            return FlowMatchEulerDiscreteScheduler.from_pretrained(folder, subfolder=component)
        kwargs = {"dtype": dtype} if dtype is not None else {}
        if quantization != "none":
            kwargs["quantization_config"] = quantization_config(quantization, dtype)
        return loaders[component].from_pretrained(folder, subfolder=component, **kwargs)


def load_pipeline(folder: Path, dtype=None, **components):
    """A FluxPipeline from a folder; components given (e.g. transformer=..., text_encoder=None) replace its own.
    Its CLIP prompts are 77 tokens long: a local folder whose tokenizer leaves model_max_length unset would
    otherwise tokenize to transformers' 'very large integer' and overflow."""
    from diffusers import FluxPipeline

    kwargs = {"dtype": dtype} if dtype is not None else {}
    with _naming_failures(folder, "pipeline"):
        pipe = FluxPipeline.from_pretrained(folder, **components, **kwargs)
    if getattr(pipe, "tokenizer", None) is not None:
        pipe.tokenizer.model_max_length = CLIP_TOKENS
        pipe.tokenizer_max_length = CLIP_TOKENS
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


def vae_normalisation(folder: Path) -> tuple[float, float]:
    """(shift_factor, scaling_factor) of the VAE, read from its config without loading it."""
    import json

    config = json.loads((folder / "vae" / "config.json").read_text())
    return float(config.get("shift_factor") or 0.0), float(config["scaling_factor"])
