"""Stable Diffusion 1.x and XL: a UNet2DConditionModel that predicts the noise (or v) at DDPM timesteps
(train/objectives.py, NoisePrediction), 4-channel VAE latents times the VAE's scaling factor, and classifier-free
guidance. SD 1.x reads one CLIP text encoder's last hidden states; SDXL two (CLIP ViT-L and OpenCLIP bigG, the
second-to-last hidden states of each side by side) plus the second one's pooled embedding and the image's size
and crop (add_time_ids).

The two share the UNet class, so a UNet is told apart by its config: SDXL's has addition_embed_type 'text_time'.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lookalike.errors import LookalikeError
from lookalike.models.families.interface import CLIP_BIG_G_TEXT, CLIP_L_TEXT, BaseModelInfo, Family, TextEncoding
from lookalike.models.tiny import (
    byte_level_clip_tokenizer,
    ensure_built,
    spec_folder_name,
    tiny_autoencoder,
    tiny_clip_text_encoder,
)

CLIP_TOKENS = 77  # both bases' CLIP prompt length

# The published UNets (their unet/config.json), for `--dry-run` and benchmarks without a download: SD 1.x
# (v1-4 and v1-5 share it, 860M parameters) and SDXL base 1.0 (2.6B).
SD1_UNET = dict(act_fn="silu", attention_head_dim=8, block_out_channels=[320, 640, 1280, 1280],
                cross_attention_dim=768, down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                in_channels=4, layers_per_block=2, norm_num_groups=32, out_channels=4, sample_size=64,
                up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3)
SDXL_UNET = dict(act_fn="silu", addition_embed_type="text_time", addition_time_embed_dim=256,
                 attention_head_dim=[5, 10, 20], block_out_channels=[320, 640, 1280], cross_attention_dim=2048,
                 down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"], in_channels=4,
                 layers_per_block=2, norm_num_groups=32, out_channels=4, projection_class_embeddings_input_dim=2816,
                 sample_size=128, transformer_layers_per_block=[1, 2, 10],
                 up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], use_linear_projection=True)
# Both bases' noise schedule: DDPM's scaled-linear betas over 1000 timesteps, predicting the noise.
SD_SCHEDULE = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                   steps_offset=1, prediction_type="epsilon")

_ATTENTION = r"attn[12]\.(to_q|to_k|to_v|to_out\.0)"
# Variants and files a diffusers-format download needs none of: the fp16 and non-EMA copies of the weights, the
# single-file checkpoints beside the folders, and SD 1.x's safety checker (lookalike loads its pipelines without).
HUB_IGNORE = ["*.fp16.*", "*non_ema*", "*.ckpt", "safety_checker/*", "*.bin", "*.msgpack", "*.onnx*"]

TINY_FORMAT = 1  # bump when a tiny model's architecture or tokenizer changes, so old folders are not reused


@dataclass(frozen=True)
class TinyStableDiffusionSpec:
    """Sizes of a tiny SD 1.x or SDXL of the real classes, small enough to train at 64 px in milliseconds."""

    xl: bool = False
    seed: int = 0
    unet_channels: tuple[int, ...] = (16, 32)
    text_hidden: int = 32
    text_hidden_2: int | None = None  # SDXL's second text encoder's width, if not text_hidden (the real ones differ)
    vae_channels: tuple[int, ...] = (8, 16, 16, 16)  # four blocks: 8x downsampling, as their VAE

    @property
    def folder_name(self) -> str:
        return spec_folder_name(f"tiny-sd-v{TINY_FORMAT}", self)


def build_tiny_stable_diffusion(spec: TinyStableDiffusionSpec):
    """The tiny StableDiffusionPipeline (or StableDiffusionXLPipeline), deterministically from spec.seed."""
    import torch
    from diffusers import (
        EulerDiscreteScheduler,
        PNDMScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )

    tokenizer = byte_level_clip_tokenizer()
    levels = len(spec.unet_channels)
    second = spec.text_hidden_2 or spec.text_hidden
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        if spec.xl:  # SDXL's layout: no attention in the first level, the pooled text and sizes as extra input
            unet = UNet2DConditionModel(
                sample_size=8, block_out_channels=spec.unet_channels, layers_per_block=1,
                down_block_types=["DownBlock2D"] + ["CrossAttnDownBlock2D"] * (levels - 1),
                up_block_types=["CrossAttnUpBlock2D"] * (levels - 1) + ["UpBlock2D"],
                attention_head_dim=[2] * levels, transformer_layers_per_block=[1] * levels,
                cross_attention_dim=spec.text_hidden + second, use_linear_projection=True, norm_num_groups=8,
                addition_embed_type="text_time", addition_time_embed_dim=8,
                projection_class_embeddings_input_dim=6 * 8 + second)
        else:
            unet = UNet2DConditionModel(
                sample_size=8, block_out_channels=spec.unet_channels, layers_per_block=1,
                down_block_types=["CrossAttnDownBlock2D"] * (levels - 1) + ["DownBlock2D"],
                up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * (levels - 1),
                attention_head_dim=2, cross_attention_dim=spec.text_hidden, norm_num_groups=8)
        torch.manual_seed(spec.seed + 1)
        vae = tiny_autoencoder(spec.vae_channels, 4)
        torch.manual_seed(spec.seed + 2)
        text_encoder = tiny_clip_text_encoder(tokenizer, spec.text_hidden, projection=False)
        if spec.xl:
            torch.manual_seed(spec.seed + 3)
            text_encoder_2 = tiny_clip_text_encoder(tokenizer, second, projection=True)
    if spec.xl:
        scheduler = EulerDiscreteScheduler(**SD_SCHEDULE, timestep_spacing="leading")
        return StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                         tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet, scheduler=scheduler)
    scheduler = PNDMScheduler(**SD_SCHEDULE, set_alpha_to_one=False, skip_prk_steps=True)
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


class StableDiffusion(Family):
    """What SD 1.x and SDXL share."""

    denoiser = "unet"
    # diffusers' train_dreambooth_lora.py and train_dreambooth_lora_sdxl.py adapt to_k, to_q, to_v and to_out.0,
    # which in these UNets are exactly the self- and cross-attention of every transformer block; attention+mlp
    # adds their feed-forward (part of what kohya's default LoRA adapts).
    target_modules = {
        "attention": rf".*\.{_ATTENTION}",
        "diffusers": rf".*\.{_ATTENTION}",
        "attention+mlp": rf".*\.({_ATTENTION}|ff\.net\.0\.proj|ff\.net\.2)",
    }
    hub_ignore = HUB_IGNORE
    takes_negative_prompt = True
    native_resolution: int  # the side the base was trained at (BaseModelInfo.resolution)
    xl = False
    comfyui_reads_kohya = True  # ComfyUI's key map takes kohya's lora_unet_<layer> names for these UNets
    objective_kind = "noise_prediction"  # DDPM, as train_dreambooth_lora.py and _sdxl.py train

    def kohya_name(self, name: str, layers_per_block: int) -> str:
        """The layer's name in kohya's files (diffusers' own for SD 1.x: kohya trains SD 1.x on diffusers' UNet)."""
        return name

    def kohya_layer_names(self, names) -> dict[str, str]:
        """Each layer's kohya name, one for one (nothing is fused in these UNets)."""
        # An up block holds one attention more than a down block: the adapter's own names give layers_per_block.
        ups = [int(m.group(1)) for name in names if (m := re.match(r"up_blocks\.\d+\.attentions\.(\d+)\.", name))]
        return {name: self.kohya_name(name, max(ups, default=0)) for name in names}

    def fused_layers(self, modules, alpha):
        """kohya's layout, one layer for one, with the LoRA's alpha."""
        names = self.kohya_layer_names(modules)
        return {names[name]: (down.float(), up.float(), alpha) for name, (down, up) in modules.items()}

    def owns(self, denoiser_config) -> bool:
        return (denoiser_config.get("addition_embed_type") == "text_time") == self.xl

    def local_info(self, folder: Path) -> BaseModelInfo:
        return BaseModelInfo(self.name, None, CLIP_TOKENS, 50, resolution=self.native_resolution)

    def ensure_tiny(self, name: str) -> Path:
        spec = TinyStableDiffusionSpec(xl=self.xl)
        return ensure_built(spec.folder_name, lambda: build_tiny_stable_diffusion(spec))

    def text_arguments(self, text: TextEncoding) -> dict[str, Any]:
        return {}  # the CLIP encoders' own 77 tokens

    def model_input(self, latents, normalisation):
        """Layout: the image's size in pixels, which SDXL's size conditioning reads."""
        model_input, (height, width) = super().model_input(latents, normalisation)
        return model_input, (height * self.vae_factor, width * self.vae_factor)

    def pixel_multiple(self, architecture: dict) -> int:
        """The VAE's downsampling times the UNet's (each down block but the last halves the latents): 64 for SD
        1.x's UNet, 32 for SDXL's."""
        return self.vae_factor * 2 ** (len(architecture["down_block_types"]) - 1)

    def checkpointed_block_types(self, model) -> set[str]:
        return {"ResnetBlock2D", "BasicTransformerBlock"}  # the units diffusers' UNet blocks checkpoint

    def activation_values(self, architecture, resolution, text_tokens, checkpointing, every) -> float:
        from lookalike.models.activation_count import counted_activations

        return counted_activations(self, architecture, resolution, text_tokens, checkpointing, every)

    def latent_channels(self, architecture) -> int:
        return architecture["in_channels"]


class StableDiffusion1(StableDiffusion):
    name = "sd1"
    pipeline_class_name = "StableDiffusionPipeline"
    title = "SD 1.x"
    pipeline_guidance = 7.5
    components = {"unet": ("diffusers", "UNet2DConditionModel"), "vae": ("diffusers", "AutoencoderKL"),
                  "scheduler": ("diffusers", "PNDMScheduler"), "text_encoder": ("transformers", "CLIPTextModel"),
                  "tokenizer": ("transformers", "CLIPTokenizer")}
    text_components = ("text_encoder", "tokenizer")
    native_resolution = 512
    trainable_text_encoders = {"text_encoder": "lora_te"}
    single_file_parts = {"unet": "model.diffusion_model.", "vae": "first_stage_model.",
                         "text_encoder": "cond_stage_model."}
    published_text_encoders = {"text_encoder": CLIP_L_TEXT}
    bases = {
        # The pipeline's own defaults: 50 steps at CFG 7.5 (the study's guidance_scales choose), 512 px.
        "sd15": BaseModelInfo("sd1", "stable-diffusion-v1-5/stable-diffusion-v1-5", CLIP_TOKENS, 50,
                              architecture=SD1_UNET, resolution=native_resolution, licence="CreativeML OpenRAIL-M"),
        "sd14": BaseModelInfo("sd1", "CompVis/stable-diffusion-v1-4", CLIP_TOKENS, 50, architecture=SD1_UNET,
                              resolution=native_resolution, licence="CreativeML OpenRAIL-M"),
        "tiny-sd15": BaseModelInfo("sd1", None, CLIP_TOKENS, 50),
    }
    negative_prompt = ""  # the pipeline's unconditional prompt when none is given
    kohya_base_version = "sd_v1"
    modelspec_architectures = {"sd15": "stable-diffusion-v1/lora", "sd14": "stable-diffusion-v1/lora"}

    def pipeline_overrides(self) -> dict[str, Any]:
        # No safety checker: it blanks portraits it misjudges, and the study scores every image.
        return {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}

    def text_shapes(self, architecture, tokens):
        return {"prompt_embeds": (CLIP_TOKENS, architecture["cross_attention_dim"])}

    def encode(self, pipe, caption: str, text: TextEncoding, device) -> dict[str, Any]:
        embeds, _ = pipe.encode_prompt(caption, device, 1, False)
        return {"prompt_embeds": embeds[0]}

    def predict(self, unet, config, noisy, timesteps, texts, guidance, layout, device, dtype):
        import torch

        embeds = torch.stack([t["prompt_embeds"] for t in texts]).to(device, dtype)
        return unet(noisy.to(device, dtype), timesteps.to(device), embeds, return_dict=False)[0]

    def pipeline_embeddings(self, text, negative, device, dtype) -> dict:
        return {"prompt_embeds": text["prompt_embeds"][None].to(device, dtype),
                "negative_prompt_embeds": None if negative is None else negative["prompt_embeds"][None].to(device,
                                                                                                           dtype)}


class StableDiffusionXL(StableDiffusion):
    name = "sdxl"
    pipeline_class_name = "StableDiffusionXLPipeline"
    title = "SDXL"
    pipeline_guidance = 5.0
    components = {"unet": ("diffusers", "UNet2DConditionModel"), "vae": ("diffusers", "AutoencoderKL"),
                  "scheduler": ("diffusers", "EulerDiscreteScheduler"),
                  "text_encoder": ("transformers", "CLIPTextModel"), "tokenizer": ("transformers", "CLIPTokenizer"),
                  "text_encoder_2": ("transformers", "CLIPTextModelWithProjection"),
                  "tokenizer_2": ("transformers", "CLIPTokenizer")}
    text_components = ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")
    native_resolution = 1024
    trainable_text_encoders = {"text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}
    single_file_parts = {"unet": "model.diffusion_model.", "vae": "first_stage_model.",
                         "text_encoder": "conditioner.embedders.0.", "text_encoder_2": "conditioner.embedders.1."}
    published_text_encoders = {"text_encoder": CLIP_L_TEXT, "text_encoder_2": CLIP_BIG_G_TEXT}
    bases = {
        # The pipeline's own defaults: 50 steps at CFG 5.0, 1024 px.
        "sdxl": BaseModelInfo("sdxl", "stabilityai/stable-diffusion-xl-base-1.0", CLIP_TOKENS, 50,
                              architecture=SDXL_UNET, resolution=native_resolution, licence="CreativeML Open RAIL++-M"),
        "tiny-sdxl": BaseModelInfo("sdxl", None, CLIP_TOKENS, 50),
    }
    # None: SDXL's pipeline guides against zero embeddings when no negative prompt is given
    # (force_zeros_for_empty_prompt, on in the base's config and in a pipeline built for samples), so samples need
    # no negative embedding either.
    negative_prompt = None
    kohya_base_version = "sdxl_base_v1-0"
    modelspec_architectures = {"sdxl": "stable-diffusion-xl-v1-base/lora"}
    xl = True

    def kohya_name(self, name: str, layers_per_block: int) -> str:
        """kohya trains SDXL on the original (SGM) UNet, whose blocks are numbered through: down block i's
        attention j is input_blocks.(1 + i (L + 1) + j).1, up block i's output_blocks.(i (L + 1) + j).1, the middle
        one middle_block.1 (L: layers per block)."""
        if layers_per_block < 1:
            raise LookalikeError("cannot export: kohya numbers SDXL's layers by the up blocks' attention, which this "
                                 "LoRA does not adapt")
        match = re.fullmatch(r"(down|up)_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", name)
        if match:
            kind, block, index, rest = match.group(1), int(match.group(2)), int(match.group(3)), match.group(4)
            number = block * (layers_per_block + 1) + index + (1 if kind == "down" else 0)
            return f"{'input' if kind == 'down' else 'output'}_blocks.{number}.1.{rest}"
        match = re.fullmatch(r"mid_block\.attentions\.0\.(.+)", name)
        if match:
            return f"middle_block.1.{match.group(1)}"
        raise LookalikeError(f"cannot export: no kohya name for the SDXL layer {name}")

    def text_shapes(self, architecture, tokens):
        return {"prompt_embeds": (CLIP_TOKENS, architecture["cross_attention_dim"]),
                "pooled": (architecture["projection_class_embeddings_input_dim"]
                           - 6 * architecture["addition_time_embed_dim"],)}

    def encode(self, pipe, caption: str, text: TextEncoding, device) -> dict[str, Any]:
        embeds, _, pooled, _ = pipe.encode_prompt(caption, device=device, num_images_per_prompt=1,
                                                  do_classifier_free_guidance=False)
        return {"prompt_embeds": embeds[0], "pooled": pooled[0]}

    def predict(self, unet, config, noisy, timesteps, texts, guidance, layout, device, dtype):
        """add_time_ids: the crops are made at the training size, so the original and target sizes are both it
        and the crop's top-left corner is (0, 0): what the pipeline conditions on when it draws at that size."""
        import torch

        height, width = layout
        batch = len(texts)
        time_ids = torch.tensor([[height, width, 0, 0, height, width]] * batch, device=device, dtype=dtype)
        added = {"text_embeds": torch.stack([t["pooled"] for t in texts]).to(device, dtype), "time_ids": time_ids}
        embeds = torch.stack([t["prompt_embeds"] for t in texts]).to(device, dtype)
        return unet(noisy.to(device, dtype), timesteps.to(device), embeds, added_cond_kwargs=added,
                    return_dict=False)[0]

    def pipeline_embeddings(self, text, negative, device, dtype) -> dict:
        return {"prompt_embeds": text["prompt_embeds"][None].to(device, dtype),
                "pooled_prompt_embeds": text["pooled"][None].to(device, dtype)}
