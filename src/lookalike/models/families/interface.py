"""The interface of a model family (see families/__init__.py), and what a base is made for."""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

VAE_FACTOR = 8  # pixels per latent side: every family's VAE but Qwen-Image 2.1's (Family.vae_factor)

# The text encoders several families hold, as published, for `--dry-run` of a run that trains or holds them,
# without a download. OpenAI's CLIP ViT-L/14 text model (text_encoder/config.json of FLUX.1, SD 1.x, SDXL and SD3;
# 123M parameters):
CLIP_L_TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, projection_dim=768,
                   num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu")
# OpenCLIP ViT-bigG/14's text model with its projection (SDXL's and SD3's second; 695M parameters):
CLIP_BIG_G_TEXT = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, projection_dim=1280,
                       num_hidden_layers=32, num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu")
# google/t5-v1_1-xxl's encoder (FLUX.1's and SD3's T5; 4.8B parameters):
T5_XXL_ENCODER = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                      feed_forward_proj="gated-gelu", relative_attention_num_buckets=32,
                      relative_attention_max_distance=128)


def is_distilled(folder: Path) -> bool:
    """Whether a local pipeline folder says its transformer is distilled (model_index.json `is_distilled`, as
    FLUX.2 [klein] and Krea 2 write it); a folder not readable yet: no (loading it will say what is wrong)."""
    try:
        return bool(json.loads((Path(folder) / "model_index.json").read_text()).get("is_distilled", False))
    except (OSError, ValueError, AttributeError):
        return False


@dataclass(frozen=True)
class BaseModelInfo:
    """What a base is made for: its family and its generation defaults."""

    family: str
    repo: str | None  # hub repository, None for models built or stored locally
    max_sequence_length: int  # text tokens per prompt
    steps: int  # inference steps: [generate] num_inference_steps when not set
    guidance: bool = True  # takes a guidance scale (FLUX.1-dev's distilled guidance, Z-Image's CFG); schnell none
    # A hub base's transformer as published (the sizes of its config.json), so that `--dry-run` builds it on the
    # meta device without any download; None for a model whose own config file is read (local, tiny).
    architecture: dict | None = None
    # The side a base was trained at, where runs should not go beyond it unless [train] resolution says so
    # (SD 1.x: 512, SDXL: 1024); None: no such limit, runs train at [data] resolution.
    resolution: int | None = None
    # Its licence as its model card gives it (None: read the model card), and whether the hub asks a user to accept
    # it before the download (then `hf auth login` once).
    licence: str | None = None
    gated: bool = False
    # The guidance scale its model card draws with, where that differs from its pipeline's default
    # (Family.pipeline_guidance): [generate] guidance_scales when the study sets none.
    guidance_scale: float | None = None


@dataclass(frozen=True)
class TextEncoding:
    """How a prompt becomes embeddings: its length in tokens, and for a family whose pipeline stacks hidden layers
    of its text encoder (Family.text_layers), which layers (None: the pipeline's own)."""

    tokens: int
    layers: tuple[int, ...] | None = None

    def settings(self) -> dict[str, Any]:
        """As an image's settings record it (generate.job_settings): the layers only where chosen, so that images
        made before the choice existed stay current."""
        return {"max_sequence_length": self.tokens,
                **({} if self.layers is None else {"text_encoder_out_layers": list(self.layers)})}

    @classmethod
    def of_image(cls, settings: dict[str, Any]) -> TextEncoding:
        """As an image's settings record it (settings())."""
        layers = settings.get("text_encoder_out_layers")
        return cls(settings["max_sequence_length"], None if layers is None else tuple(layers))


@dataclass(frozen=True)
class RouteLayout:
    """How a denoiser's blocks take and give their tokens, for token routing (train/tread.py): the blocks in the
    order they run, and each block call's image tokens, text tokens and rotary embedding as (keyword, position);
    each block returns (text tokens, image tokens). `rotary_rows` says where the image tokens' rotary rows are:
    after the text tokens' ("text then image"), or the first of an (image, text) pair ("image of a pair"); a family
    without a rotary embedding has `rotary` None."""

    blocks: list
    image: tuple[str, int]
    text: tuple[str, int]
    rotary: tuple[str, int] | None = None
    rotary_rows: str = "text then image"


class Family(ABC):
    """The interface every family implements (what each part is for: families/__init__.py): the abstract methods
    below, and the class attributes declared without a value. Tensors are torch tensors."""

    name: str
    title: str  # the family's name as people write it (FLUX.2 [klein]), in help and docs
    pipeline_class_name: str  # diffusers' pipeline, as model_index.json names it
    denoiser = "transformer"  # the pipeline component that denoises, which the LoRA adapts (transformer or unet)
    components: dict[str, tuple[str, str]]  # component -> (library, class name) for loading it on its own
    text_components: tuple[str, ...]  # what a cached text embedding depends on
    bases: dict[str, BaseModelInfo]  # lookalike's names for the family's hub models and tiny models
    target_modules: dict[str, str]  # [train] target_modules preset -> regex of the adapted layers
    negative_prompt: str | None = None  # encoded once for samples, where generation uses true CFG
    hub_ignore: list[str] = []  # files of a hub repository a diffusers-format download leaves out
    # The components a single-file checkpoint of the family's bases can hold ([model] checkpoint), each by the prefix
    # of its keys in the original layout; None: such a file is the denoiser alone (a transformer's fine-tune).
    single_file_parts: dict[str, str] | None = None
    takes_negative_prompt = False  # its pipeline guides (classifier-free) against a negative prompt a user gives
    kohya_base_version: str | None = None  # ss_base_model_version, as kohya's tools and sites read it
    modelspec_architectures: dict[str, str] = {}  # base -> modelspec.architecture, where one is established
    comfyui_reads_kohya = False  # ComfyUI's layout is kohya's (SD UNets), not diffusion_model.<layer> (FLUX.1)
    vae_factor = VAE_FACTOR  # pixels per latent side
    latent_patch = 2  # latents per token side: the transformers' 2x2 patches
    # The text encoders a run may train a LoRA on (train.train_text_encoder), as the family's reference script does
    # with --train_text_encoder, and each one's prefix in kohya's layout (lora_te_<layer>).
    trainable_text_encoders: dict[str, str] = {}
    # Every text encoder's config as the family's hub bases publish it, where a run can train one: what a run that
    # does holds (`--dry-run` counts them without a download).
    published_text_encoders: dict[str, dict] = {}
    # The training recipe of the family's diffusers reference script (train_dreambooth_lora_<family>.py), which a
    # [train] key left unset takes (train/reference_recipe.py): how its noise levels are drawn (its
    # --weighting_scheme default: "none" draws them uniformly), and whether it trains on the VAE posterior's sample
    # or its mode. The grid they index is the base's scheduler's (grid_shift).
    reference_sampling = "uniform"
    reference_posterior = "sample"
    # How training noises clean latents and what the denoiser learns to predict (train/objectives.py): flow
    # matching; preconditioned flow matching (SD3's script); DDPM noise prediction (SD 1.x, SDXL).
    objective_kind = "flow_matching"
    # The guidance scale its pipeline's __call__ defaults to (guidance_scale, or true_cfg_scale for Qwen-Image).
    pipeline_guidance: float
    # Its guidance-embedding bases take a distilled guidance scale in the transformer, while training too
    # (train.guidance): FLUX.1-dev and FLUX.2 [dev].
    distilled_guidance = False
    # The hidden layers of its text encoder its pipeline stacks into a prompt's embeddings (text_encoder_out_layers),
    # where a study may choose others ([model] text_encoder_out_layers); None: its pipeline takes no such choice.
    text_layers: tuple[int, ...] | None = None

    def grid_shift(self, folder: Path) -> float:
        """The shift of the noise levels the reference script indexes: its scheduler's sigmas at construction,
        shifted by `shift` unless the scheduler shifts per image size at inference (use_dynamic_shifting), as
        FlowMatchEulerDiscreteScheduler builds them. Read from the base's scheduler config."""
        config = json.loads((Path(folder) / "scheduler" / "scheduler_config.json").read_text())
        return 1.0 if config.get("use_dynamic_shifting") else float(config.get("shift", 1.0))

    def pipeline_class(self):
        import diffusers

        return getattr(diffusers, self.pipeline_class_name)

    def component_class(self, component: str):
        import importlib

        library, name = self.components[component]
        return getattr(importlib.import_module(library), name)

    @abstractmethod
    def local_info(self, folder: Path) -> BaseModelInfo:
        """The generation defaults of a local folder of this family (its configs are read, no weights)."""

    @abstractmethod
    def ensure_tiny(self, name: str) -> Path:
        """The folder of the tiny model `name` (one of the family's bases without a repo), built offline and
        deterministically on first use, then reused."""

    def adjust_pipeline(self, pipe) -> None:
        """Settings a loaded pipeline needs whatever its folder's configs say (none by default)."""

    def adjust_denoiser(self, denoiser) -> None:
        """Settings a loaded denoiser needs whatever its folder's configs say (none by default)."""

    def owns(self, denoiser_config) -> bool:
        """Whether a denoiser of this family's class is this family's (for families sharing one class)."""
        return True

    def pipeline_overrides(self) -> dict[str, Any]:
        """Components every pipeline of the family is loaded with instead of its folder's (none by default)."""
        return {}

    def sample_pipeline(self, folder: Path, denoiser, vae, scheduler):
        """The family's pipeline around a training denoiser, drawing from cached embeddings (no text encoders);
        `folder`: the base's."""
        return self.pipeline_class()(scheduler=scheduler, vae=vae, **{self.denoiser: denoiser},
                                     **{name: None for name in self.text_components}, **self.pipeline_overrides())

    def text_arguments(self, text: TextEncoding) -> dict[str, Any]:
        """The pipeline's keyword arguments for how it encodes the prompt."""
        return {"max_sequence_length": text.tokens}

    def check_text(self, pipe, text: TextEncoding) -> None:
        """Refuse, by its key, a text encoding the pipeline's text encoders cannot give (none by default)."""

    @abstractmethod
    def encode(self, pipe, caption: str, text: TextEncoding, device) -> dict[str, Any]:
        """One caption's embeddings as cached: named tensors without a batch dimension."""

    def encode_pixels(self, vae, pixels):
        """The VAE's posterior (mean, std) for one image (3, H, W) in [-1, 1], each (C, h, w)."""
        posterior = vae.encode(pixels[None]).latent_dist
        return posterior.mean[0], posterior.std[0]

    def guidance_arguments(self, guidance: float | None, by_embeddings: bool) -> dict:
        """The pipeline's keyword arguments for a guidance scale (None: a base that takes none). by_embeddings:
        the prompt is given as embeddings (pipeline_embeddings), negative ones included."""
        return {"guidance_scale": 0.0 if guidance is None else guidance}

    def pixel_multiple(self, architecture: dict) -> int:
        """What a training image's sides must be multiples of, by the denoiser's config: the VAE's downsampling
        times the transformer's patches (what the family's pipeline asks of a height and width)."""
        return self.vae_factor * self.latent_patch

    def latent_normalisation(self, folder: Path):
        """What model_input normalises the VAE's latents with: by default (shift_factor, scaling_factor) of the
        VAE's config (read without loading the VAE)."""
        config = json.loads((Path(folder) / "vae" / "config.json").read_text())
        return float(config.get("shift_factor") or 0.0), float(config["scaling_factor"])

    def model_input(self, latents, normalisation):
        """The VAE's latents (B, C, H, W), normalised, as the transformer's input (the training target's space),
        and the layout predict needs to read it. By default (latents - shift) * scale."""
        shift, scale = normalisation
        return (latents - shift) * scale, latents.shape[-2:]

    @abstractmethod
    def predict(self, transformer, config, noisy, levels, texts: list[dict[str, Any]], guidance: float, layout,
                device, dtype):
        """The denoiser's prediction at noise levels `levels`, in its objective's terms: the flow velocity (noise -
        clean latents) at sigmas, or the noise (or v) at DDPM timesteps. `config`: the denoiser's own config
        (`transformer` may be wrapped for distributed training)."""

    def latent_channels(self, architecture: dict) -> int:
        """The VAE latent channels the transformer reads (by default packed 2x2 into its in_channels)."""
        return architecture["in_channels"] // 4

    def text_shapes(self, architecture: dict, tokens: int) -> dict[str, tuple[int, ...]]:
        """The shapes of one cached caption's tensors (what encode returns), for benchmarks on random inputs."""
        return {"prompt_embeds": (tokens, architecture["joint_attention_dim"])}

    def hidden_size(self, architecture: dict) -> int:
        """The transformer's hidden size: what activation figures are counted per."""
        return architecture["num_attention_heads"] * architecture["attention_head_dim"]

    def route_layout(self, model) -> RouteLayout | None:
        """How train.tread routes tokens around the denoiser's blocks; None where it is not built for this family."""
        return None

    def checkpointed_block_types(self, model) -> set[str]:
        """The class names of the denoiser's blocks gradient checkpointing recomputes (by default its repeated
        blocks)."""
        return set(model._repeated_blocks)

    @abstractmethod
    def activation_values(self, architecture: dict, resolution: int, text_tokens: int, checkpointing: bool,
                          every: int) -> float:
        """Activation values one example keeps at the peak of a training step (what `--dry-run` counts)."""

    def fused_layers(self, modules: dict[str, tuple], alpha: float) -> dict[str, tuple] | None:
        """For a family with a kohya layout: kohya's layer name (dotted) -> (down, up, alpha) for every layer a
        LoRA's modules (diffusers name -> (down, up)) touch, where kohya names layers as the original checkpoint
        does and may fuse several into one. None (the default): no kohya layout; its tools read diffusers'
        names."""
        return None

    def kohya_layer_names(self, names) -> dict[str, str] | None:
        """For a family whose kohya layout names each layer apart (the SD UNets): diffusers' layer name -> kohya's
        (dotted). None (the default): its kohya layout fuses layers (FLUX.1's q, k and v are one), or it has none."""
        return None

    @abstractmethod
    def pipeline_embeddings(self, text: dict[str, Any], negative: dict[str, Any] | None, device, dtype) -> dict:
        """The pipeline's keyword arguments that hand it one prompt's cached embeddings instead of a prompt."""


class TransformerFamily(Family):
    """A family whose denoiser is a transformer of repeated blocks (all but the SD UNets): its activations are
    counted block by block, from figures measured per token and hidden unit."""

    # Values each kind of transformer block keeps for the backward pass, per token and hidden unit, measured on
    # the family's blocks (bench/activation_figures.py), and the backward pass's own working values.
    activation_figures: dict[str, float]
    backward_working: float

    @abstractmethod
    def blocks(self, architecture: dict, image_tokens: int, text_tokens: int) -> list[tuple[str, int]]:
        """The transformer's blocks in the order its model holds them (the order gradient checkpointing counts
        them in): each block's kind, a key of activation_figures, and the tokens it runs on."""

    def activation_values(self, architecture: dict, resolution: int, text_tokens: int, checkpointing: bool,
                          every: int) -> float:
        """Activation values one example keeps at the peak of a training step. A block keeps its figure per
        token and hidden unit; a checkpointed block only its input (one value per token and hidden unit), and
        recomputes the rest during the backward pass, one block at a time; the backward pass's own working values
        come on top."""
        hidden = self.hidden_size(architecture)
        image_tokens = (resolution // (self.vae_factor * self.latent_patch)) ** 2
        blocks = [(self.activation_figures[kind] * tokens * hidden, tokens * hidden)
                  for kind, tokens in self.blocks(architecture, image_tokens, text_tokens)]
        checkpointed = set(range(0, len(blocks), every)) if checkpointing else set()
        kept = sum(block_input if index in checkpointed else values
                   for index, (values, block_input) in enumerate(blocks))
        recomputed = max((blocks[index][0] for index in checkpointed), default=0.0)
        return kept + recomputed + self.backward_working * (image_tokens + text_tokens) * hidden
