"""Qwen-Image 2.1: QwenImage21Pipeline, a Qwen3-VL text encoder read through its processor (the last decoder
layer's hidden states before its final norm, after the prompt's system part, each caption at its own length; a
batch is padded again with a mask), a VAE that downsamples 16 times into 64 channels, normalised per channel, whose
latents the single-stream transformer reads one per token (`img_shapes`; `img_mask` marks the target's slots, one
per 2x2 latents, after the prompt's), fed sigma as its timestep, predicting the flow velocity. It is drawn without
guidance (its pipeline's true CFG is off by default). Its VAE reads and draws RGBA: photos are fed opaque, and
lookalike keeps the colour of what it draws (generate.render)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lookalike.models.families.interface import BaseModelInfo, TextEncoding, TransformerFamily
from lookalike.models.families.qwen_image import QwenImageLatents, UnpaddedPrompts
from lookalike.models.tiny import QWEN_SPECIAL_TOKENS, byte_level_qwen_tokenizer, ensure_built, spec_folder_name

# Qwen-Image 2.1's transformer as diffusers' QwenImage21Transformer2DModel documents its defaults (32 blocks at hidden
# 4096; Qwen3-VL-8B's 4096-wide hidden states), for `--dry-run` without a download.
QWEN_IMAGE21_TRANSFORMER = dict(patch_size=1, in_channels=64, out_channels=64, num_layers=32, attention_head_dim=128,
                                num_attention_heads=32, context_in_dim=4096, mlp_ratio=3, axes_dims_rope=(16, 56, 56))
TEXT_TOKENS = 128  # no limit of its own: each caption keeps its tokens; what `--dry-run` counts for a long one

VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
# Qwen3-VL's ChatML, whose message content may be a list of parts (the pipeline's system message is).
CHAT_TEMPLATE = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
                 "{{ message['content'] }}{% else %}{% for part in message['content'] %}{{ part['text'] }}{% endfor %}"
                 "{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
_ATTENTION = r"transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v|to_out\.0)"

TINY_FORMAT = 1  # bump when the tiny model's architecture or tokenizer changes, so old folders are not reused


@dataclass(frozen=True)
class TinyQwenImage21Spec:
    """Sizes of a tiny Qwen-Image 2.1: its real classes (a one-block vision tower and the processor included),
    small enough to train at 64 px in milliseconds per step."""

    seed: int = 0
    num_layers: int = 2
    attention_head_dim: int = 16
    num_attention_heads: int = 2
    latent_channels: int = 8
    text_hidden: int = 16
    vae_base: int = 8

    @property
    def folder_name(self) -> str:
        return spec_folder_name(f"tiny-qwen-image21-v{TINY_FORMAT}", self)


def tiny_processor():
    """A Qwen3VLProcessor around the byte-level Qwen tokenizer with Qwen3-VL's vision tokens and chat template."""
    from transformers import Qwen2VLImageProcessor, Qwen3VLProcessor, Qwen3VLVideoProcessor

    tokenizer = byte_level_qwen_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": QWEN_SPECIAL_TOKENS[1:] + VISION_TOKENS})
    tokenizer.chat_template = CHAT_TEMPLATE
    return Qwen3VLProcessor(image_processor=Qwen2VLImageProcessor(), tokenizer=tokenizer,
                            video_processor=Qwen3VLVideoProcessor(), chat_template=CHAT_TEMPLATE)


def build_tiny_qwen_image21(spec: TinyQwenImage21Spec = TinyQwenImage21Spec()):
    """The tiny QwenImage21Pipeline, built in memory deterministically from spec.seed."""
    import torch
    from diffusers import (
        AutoencoderKLQwenImage21,
        FlowMatchEulerDiscreteScheduler,
        QwenImage21Pipeline,
        QwenImage21Transformer2DModel,
    )
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    processor = tiny_processor()
    tokenizer = processor.tokenizer
    head = spec.attention_head_dim
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        transformer = QwenImage21Transformer2DModel(
            patch_size=1, in_channels=spec.latent_channels, out_channels=spec.latent_channels,
            num_layers=spec.num_layers, attention_head_dim=head, num_attention_heads=spec.num_attention_heads,
            context_in_dim=spec.text_hidden, mlp_ratio=3, axes_dims_rope=(head // 4, 3 * head // 8, 3 * head // 8))
        torch.manual_seed(spec.seed + 1)
        # Five blocks: 16x downsampling, as its VAE; channel statistics unlike 0 and 1, so that the normalisation is
        # exercised as the real one is.
        vae = AutoencoderKLQwenImage21(
            base_dim=spec.vae_base, decoder_base_dim=spec.vae_base, z_dim=spec.latent_channels,
            dim_mult=[1, 2, 2, 2, 2], num_res_blocks=1, temperal_downsample=[False, True, True, True],
            latents_mean=[0.1 * (i - 1) for i in range(spec.latent_channels)],
            latents_std=[0.5 + 0.25 * i for i in range(spec.latent_channels)])
        with torch.no_grad():  # a nearly deterministic posterior, as a trained VAE's (see models/tiny.py)
            vae.quant_conv.bias[spec.latent_channels:] = -12.0
        torch.manual_seed(spec.seed + 2)
        text = dict(hidden_size=spec.text_hidden, intermediate_size=spec.text_hidden * 2, num_hidden_layers=2,
                    num_attention_heads=2, num_key_value_heads=2, head_dim=spec.text_hidden // 2,
                    vocab_size=len(tokenizer), max_position_embeddings=1024, pad_token_id=tokenizer.pad_token_id)
        vision = dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=spec.text_hidden,
                      deepstack_visual_indexes=[0], num_position_embeddings=16)
        ids = {f"{name}_token_id": tokenizer.convert_tokens_to_ids(token) for name, token in
               zip(("vision_start", "vision_end", "image", "video"), VISION_TOKENS)}
        text_encoder = Qwen3VLForConditionalGeneration(Qwen3VLConfig(text_config=text, vision_config=vision, **ids))
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)
    return QwenImage21Pipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, processor=processor,
                               transformer=transformer)


class QwenImage21(QwenImageLatents, UnpaddedPrompts, TransformerFamily):
    name = "qwen-image21"
    pipeline_class_name = "QwenImage21Pipeline"
    title = "Qwen-Image 2.1"
    pipeline_guidance = 1.0  # its true_cfg_scale: no guidance
    components = {"transformer": ("diffusers", "QwenImage21Transformer2DModel"),
                  "vae": ("diffusers", "AutoencoderKLQwenImage21"),
                  "scheduler": ("diffusers", "FlowMatchEulerDiscreteScheduler"),
                  "text_encoder": ("transformers", "Qwen3VLForConditionalGeneration"),
                  "processor": ("transformers", "Qwen3VLProcessor")}
    text_components = ("text_encoder", "processor")
    bases = {
        # The pipeline's own defaults: 40 steps, no guidance.
        "qwen-image-2.1": BaseModelInfo("qwen-image21", "Qwen/Qwen-Image-2.1", TEXT_TOKENS, 40, guidance=False,
                                        architecture=QWEN_IMAGE21_TRANSFORMER),
        "tiny-qwen-image21": BaseModelInfo("qwen-image21", None, 32, 40, guidance=False),
    }
    # diffusers' train_dreambooth_lora_qwenimage21.py adapts to_q, to_k, to_v and to_out.0: every block's attention
    # (attention, the same set); attention+mlp adds the blocks' gated feed-forward.
    target_modules = {
        "attention": _ATTENTION,
        "diffusers": _ATTENTION,
        "attention+mlp": rf"{_ATTENTION}|transformer_blocks\.\d+\.img_mlp\.(proj|gate_layer|out)",
    }
    vae_factor = 16
    latent_patch = 1  # one token per latent (the 2x2 groups are the text encoder's image slots)
    # Measured by bench/activation_figures.py on Qwen-Image 2.1's blocks; the backward pass's working values from the
    # tiny model's measured step (tests/test_memory.py): FLUX.1's ratio to the block's figure (11.0 / 13.2) gave
    # 19.3, 30% above what it holds.
    activation_figures = {"block": 23.1}
    backward_working = 8.0

    def pixel_multiple(self, architecture: dict) -> int:
        return 2 * self.vae_factor  # the pipeline's: a target slot is 2x2 latents

    def latent_channels(self, architecture) -> int:
        return architecture["in_channels"]

    def text_shapes(self, architecture, tokens):
        return {"prompt_embeds": (tokens, architecture["context_in_dim"])}

    def blocks(self, architecture, image_tokens, text_tokens):
        return [("block", image_tokens + text_tokens)] * architecture["num_layers"]

    def local_info(self, folder: Path) -> BaseModelInfo:
        return BaseModelInfo("qwen-image21", None, TEXT_TOKENS, 40, guidance=False)

    def ensure_tiny(self, name: str) -> Path:
        return ensure_built(TinyQwenImage21Spec().folder_name, build_tiny_qwen_image21)

    def sample_pipeline(self, folder, denoiser, vae, scheduler):
        """The pipeline needs its processor even without its text encoder (it counts the system prompt's tokens),
        and keeps the folder's sampling sigmas."""
        index = json.loads((Path(folder) / "model_index.json").read_text())
        processor = self.component_class("processor").from_pretrained(folder, subfolder="processor")
        return self.pipeline_class()(scheduler=scheduler, vae=vae, transformer=denoiser, text_encoder=None,
                                     processor=processor, sample_sigmas=index.get("sample_sigmas"))

    def text_arguments(self, text: TextEncoding) -> dict[str, Any]:
        return {}  # each prompt at its own length

    def encode(self, pipe, caption: str, text: TextEncoding, device) -> dict[str, Any]:
        embeds, _, _ = pipe.encode_prompt(caption, device=device)
        return {"prompt_embeds": embeds[0]}  # one caption: no padding, every token is its own

    def guidance_arguments(self, guidance, by_embeddings) -> dict:
        if guidance is None:
            return {"true_cfg_scale": 1.0}
        return {"true_cfg_scale": guidance, **({} if by_embeddings else {"negative_prompt": " "})}

    def encode_pixels(self, vae, pixels):
        """Its VAE reads RGBA: a photo is opaque (alpha 1 in [-1, 1], as the reference script's RGBA
        conversion gives), one frame of a video."""
        import torch

        rgba = torch.cat([pixels, torch.ones_like(pixels[:1])])
        posterior = vae.encode(rgba[None, :, None]).latent_dist
        return posterior.mean[0, :, 0], posterior.std[0, :, 0]

    def model_input(self, latents, normalisation):
        """Normalised latents, one token per latent (the pipeline's plain spatial flatten)."""
        from diffusers import QwenImage21Pipeline

        mean, std = normalisation
        latents = (latents - mean) / std
        batch, channels, height, width = latents.shape
        return QwenImage21Pipeline._pack_latents(latents, batch, channels, height, width), (height, width)

    def predict(self, transformer, config, noisy, sigmas, texts, guidance, layout, device, dtype):
        import torch

        embeds, mask = self.padded(texts, device, dtype)
        height, width = layout
        batch = len(texts)
        slots = torch.cat([torch.zeros(batch, embeds.shape[1], dtype=torch.bool),
                           torch.ones(batch, height * width // 4, dtype=torch.bool)], dim=1)
        output = transformer(hidden_states=noisy.to(device, dtype), encoder_hidden_states=embeds,
                             encoder_hidden_states_mask=mask, timestep=sigmas.to(device, dtype),
                             img_shapes=[[(1, height, width)]] * batch, img_mask=slots.to(device),
                             return_dict=False)[0]
        return output[:, -noisy.shape[1]:]  # the prediction spans the joint sequence: the target's tail
