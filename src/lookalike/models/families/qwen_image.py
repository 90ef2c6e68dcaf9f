"""Qwen-Image: QwenImagePipeline, a Qwen2.5-VL text encoder (its last hidden states after the prompt
template's system part, padding dropped, so each caption keeps its own length; a batch is padded again with a
mask), a video VAE whose latents (one frame) are normalised per channel by its config's latents_mean and
latents_std, 2x2-packed tokens, a transformer fed sigma as its timestep that predicts the flow velocity.
Generation uses true classifier-free guidance (true_cfg_scale) against the negative prompt " "."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lookalike.models.families.interface import BaseModelInfo, RouteLayout, TextEncoding, TransformerFamily
from lookalike.models.tiny import byte_level_qwen_tokenizer, ensure_built, spec_folder_name

# The published transformer of Qwen-Image (20B parameters; joint_attention_dim: Qwen2.5-VL-7B's hidden size).
QWEN_IMAGE_TRANSFORMER = dict(patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128,
                              num_attention_heads=24, joint_attention_dim=3584, guidance_embeds=False,
                              axes_dims_rope=(16, 56, 56))

TINY_FORMAT = 1  # bump when the tiny model's architecture or tokenizer changes, so old folders are not reused
_ATTENTION = r"transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
_MLP = r"transformer_blocks\.\d+\.(img_mlp|txt_mlp)\.net\.(0\.proj|2)"


@dataclass(frozen=True)
class TinyQwenImageSpec:
    """Sizes of a tiny Qwen-Image: its real classes (a one-block vision tower included), small enough to train
    at 64 px in milliseconds per step."""

    seed: int = 0
    num_layers: int = 1
    attention_head_dim: int = 16
    num_attention_heads: int = 2
    latent_channels: int = 4
    text_hidden: int = 16
    vae_base: int = 8

    @property
    def folder_name(self) -> str:
        return spec_folder_name(f"tiny-qwen-image-v{TINY_FORMAT}", self)


def tiny_qwen_image_vae(base_dim: int, latent_channels: int):
    """A tiny AutoencoderKLQwenImage (Qwen-Image's and Krea 2's VAE): 8x downsampling, channel statistics unlike 0
    and 1 so that the normalisation is exercised as the real one is."""
    import torch
    from diffusers import AutoencoderKLQwenImage

    vae = AutoencoderKLQwenImage(
        base_dim=base_dim, z_dim=latent_channels, dim_mult=[1, 2, 4, 4], num_res_blocks=1,
        temperal_downsample=[False, True, True], latents_mean=[0.1 * (i - 1) for i in range(latent_channels)],
        latents_std=[0.5 + 0.25 * i for i in range(latent_channels)])
    with torch.no_grad():  # a nearly deterministic posterior, as a trained VAE's (see models/tiny.py)
        vae.quant_conv.bias[latent_channels:] = -12.0
    return vae


def build_tiny_qwen_image(spec: TinyQwenImageSpec = TinyQwenImageSpec()):
    """The tiny QwenImagePipeline, built in memory deterministically from spec.seed."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tokenizer = byte_level_qwen_tokenizer()
    head = spec.attention_head_dim
    text_head = spec.text_hidden // 2
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        transformer = QwenImageTransformer2DModel(
            patch_size=2, in_channels=spec.latent_channels * 4, out_channels=spec.latent_channels,
            num_layers=spec.num_layers, attention_head_dim=head, num_attention_heads=spec.num_attention_heads,
            joint_attention_dim=spec.text_hidden, axes_dims_rope=(head // 4, 3 * head // 8, 3 * head // 8))
        torch.manual_seed(spec.seed + 1)
        vae = tiny_qwen_image_vae(spec.vae_base, spec.latent_channels)
        torch.manual_seed(spec.seed + 2)
        text = dict(hidden_size=spec.text_hidden, intermediate_size=spec.text_hidden * 2, num_hidden_layers=2,
                    num_attention_heads=2, num_key_value_heads=2, vocab_size=len(tokenizer),
                    max_position_embeddings=1024, bos_token_id=tokenizer.pad_token_id,
                    eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                    # the multimodal rotary sections share half a head's dimensions
                    rope_scaling={"type": "mrope", "mrope_section": [text_head // 8, text_head // 8,
                                                                     text_head // 2 - 2 * (text_head // 8)]})
        vision = dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=spec.text_hidden,
                      fullatt_block_indexes=[0])
        text_encoder = Qwen2_5_VLForConditionalGeneration(
            Qwen2_5_VLConfig(text_config=text, vision_config=vision, vocab_size=len(tokenizer)))
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)
    return QwenImagePipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                             transformer=transformer)


class QwenImageLatents:
    """The latents of a family with a video VAE of Qwen-Image's kind (Qwen-Image and Krea 2; Qwen-Image 2.1 feeds
    its own RGBA and flattens instead of packing): one frame, normalised per channel by its config's latents_mean and
    latents_std, packed into 2x2 tokens."""

    def encode_pixels(self, vae, pixels):
        posterior = vae.encode(pixels[None, :, None]).latent_dist  # one frame of a video
        return posterior.mean[0, :, 0], posterior.std[0, :, 0]

    def latent_normalisation(self, folder: Path):
        import torch

        config = json.loads((Path(folder) / "vae" / "config.json").read_text())
        return (torch.tensor(config["latents_mean"]).view(1, -1, 1, 1),
                torch.tensor(config["latents_std"]).view(1, -1, 1, 1))

    def model_input(self, latents, normalisation):
        from diffusers import QwenImagePipeline

        mean, std = normalisation
        latents = (latents - mean) / std
        batch, channels, height, width = latents.shape
        return QwenImagePipeline._pack_latents(latents, batch, channels, height, width), (height, width)


class UnpaddedPrompts:
    """The prompts of a family whose cache keeps each caption's own tokens (Qwen-Image and 2.1): a batch is padded
    again with a mask, and a pipeline is handed one prompt's embeddings as they are."""

    @staticmethod
    def padded(texts, device, dtype):
        """(embeddings, mask) of a batch of captions, zeros after each one's tokens; as the pipelines'
        encode_prompt, a batch of captions of one length needs no mask (None)."""
        import torch

        lengths = [t["prompt_embeds"].shape[0] for t in texts]
        longest = max(lengths)
        embeds = torch.stack([torch.cat([t["prompt_embeds"], t["prompt_embeds"].new_zeros(
            longest - length, t["prompt_embeds"].shape[1])]) for t, length in zip(texts, lengths)]).to(device, dtype)
        mask = None if len(set(lengths)) == 1 else torch.tensor(
            [[1] * length + [0] * (longest - length) for length in lengths], device=device)
        return embeds, mask

    def pipeline_embeddings(self, text, negative, device, dtype) -> dict:
        embeddings = {"prompt_embeds": text["prompt_embeds"][None].to(device, dtype)}
        if negative is not None:
            embeddings["negative_prompt_embeds"] = negative["prompt_embeds"][None].to(device, dtype)
        return embeddings


class QwenImage(QwenImageLatents, UnpaddedPrompts, TransformerFamily):
    name = "qwen-image"
    pipeline_class_name = "QwenImagePipeline"
    title = "Qwen-Image"
    pipeline_guidance = 4.0  # its true_cfg_scale
    components = {"transformer": ("diffusers", "QwenImageTransformer2DModel"),
                  "vae": ("diffusers", "AutoencoderKLQwenImage"),
                  "scheduler": ("diffusers", "FlowMatchEulerDiscreteScheduler"),
                  "text_encoder": ("transformers", "Qwen2_5_VLForConditionalGeneration"),
                  "tokenizer": ("transformers", "AutoTokenizer")}
    text_components = ("text_encoder", "tokenizer")
    bases = {
        # The pipeline's own defaults: 50 steps, true CFG 4.0. Qwen-Image-2512 is its December 2025 update, of the
        # same architecture (more realistic people, its card says).
        "qwen-image": BaseModelInfo("qwen-image", "Qwen/Qwen-Image", 512, 50, architecture=QWEN_IMAGE_TRANSFORMER,
                                    licence="Apache 2.0"),
        "qwen-image-2512": BaseModelInfo("qwen-image", "Qwen/Qwen-Image-2512", 512, 50,
                                         architecture=QWEN_IMAGE_TRANSFORMER, licence="Apache 2.0"),
        "tiny-qwen-image": BaseModelInfo("qwen-image", None, 32, 28),
    }
    # diffusers' train_dreambooth_lora_qwen_image.py adapts to_q, to_k, to_v and to_out.0 (the image stream's
    # attention); attention adds the text stream's; attention+mlp both streams' feed-forward.
    target_modules = {
        "attention": _ATTENTION,
        "diffusers": r"transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v|to_out\.0)",
        "attention+mlp": rf"{_ATTENTION}|{_MLP}",
    }
    takes_negative_prompt = True
    negative_prompt = " "  # what the pipeline's documentation uses to turn true CFG on
    # Measured by bench/activation_figures.py on Qwen-Image's blocks; the backward pass's working values at FLUX.1's
    # measured ratio to its largest block's figure (11.0 / 13.2).
    activation_figures = {"block": 13.1}
    backward_working = 10.9

    def route_layout(self, model) -> RouteLayout | None:
        # Its blocks take (hidden_states, encoder_hidden_states, encoder_hidden_states_mask, temb, image_rotary_emb,
        # ...) and give (encoder_hidden_states, hidden_states), in diffusers' QwenImageTransformer2DModel.forward;
        # the rotary embedding is an (image, text) pair. A transformer that modulates each image token by an index
        # (zero_cond_t, for editing) would need that index routed too: not built.
        if model.config.get("zero_cond_t"):
            return None
        return RouteLayout(blocks=list(model.transformer_blocks), image=("hidden_states", 0),
                           text=("encoder_hidden_states", 1), rotary=("image_rotary_emb", 4),
                           rotary_rows="image of a pair")

    def blocks(self, architecture, image_tokens, text_tokens):
        return [("block", image_tokens + text_tokens)] * architecture["num_layers"]

    def local_info(self, folder: Path) -> BaseModelInfo:
        return BaseModelInfo("qwen-image", None, 512, 50)

    def ensure_tiny(self, name: str) -> Path:
        return ensure_built(TinyQwenImageSpec().folder_name, build_tiny_qwen_image)

    def encode(self, pipe, caption: str, text: TextEncoding, device) -> dict[str, Any]:
        embeds, _ = pipe.encode_prompt(caption, device=device, max_sequence_length=text.tokens)
        return {"prompt_embeds": embeds[0]}  # one caption: no padding, every token is its own

    def guidance_arguments(self, guidance, by_embeddings) -> dict:
        if guidance is None:
            return {"true_cfg_scale": 1.0}
        return {"true_cfg_scale": guidance, **({} if by_embeddings else {"negative_prompt": self.negative_prompt})}

    def predict(self, transformer, config, noisy, sigmas, texts, guidance, layout, device, dtype):
        import torch

        embeds, mask = self.padded(texts, device, dtype)
        height, width = layout
        return transformer(
            hidden_states=noisy.to(device, dtype),
            encoder_hidden_states=embeds,
            encoder_hidden_states_mask=mask,
            timestep=sigmas.to(device),
            img_shapes=[(1, height // 2, width // 2)] * len(texts),
            guidance=torch.full((len(texts),), guidance, device=device) if config.guidance_embeds else None,
            return_dict=False,
        )[0]
