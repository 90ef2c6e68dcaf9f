"""FLUX.2 [klein] (4B, 9B): Flux2KleinPipeline, a Qwen3 text encoder whose hidden states of layers 9, 18 and
27 are stacked side by side (padded to the full sequence length), VAE latents cut into 2x2 patches and
normalised by the VAE's own batch-norm statistics, 4-D position ids (T, H, W, L) for text and image tokens, a
transformer fed sigma as its timestep that predicts the flow velocity. The distilled models draw in 4 steps
without guidance; an undistilled one uses true classifier-free guidance against an empty prompt."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lookalike.errors import LookalikeError
from lookalike.models.families.interface import BaseModelInfo, TextEncoding, TransformerFamily, is_distilled
from lookalike.models.tiny import byte_level_qwen_tokenizer, ensure_built, spec_folder_name

TINY_FORMAT = 2  # bump when the tiny model's architecture or tokenizer changes, so old folders are not reused
# The tiny text encoder's depth: its pipeline's layers and train_dreambooth_lora_flux2_klein.py's (10, 20, 30) can
# both be read ([model] text_encoder_out_layers).
TINY_TEXT_ENCODER_LAYERS = 31

# What the published FLUX.2 transformers share, and those of FLUX.2 [klein] 4B and 9B (their joint_attention_dim:
# three stacked layers of Qwen3-4B's 2560 and Qwen3-8B's 4096 hidden units).
FLUX2_COMMON = dict(patch_size=1, in_channels=128, attention_head_dim=128, timestep_guidance_channels=256,
                    mlp_ratio=3.0, axes_dims_rope=(32, 32, 32, 32), rope_theta=2000, guidance_embeds=False)
KLEIN_4B_TRANSFORMER = dict(FLUX2_COMMON, num_layers=5, num_single_layers=20, num_attention_heads=24,
                            joint_attention_dim=7680)
KLEIN_9B_TRANSFORMER = dict(FLUX2_COMMON, num_layers=8, num_single_layers=24, num_attention_heads=32,
                            joint_attention_dim=12288)

_DOUBLE_ATTENTION = (r"transformer_blocks\.\d+\.attn\."
                     r"(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)")
# A single block fuses q, k, v and the MLP's input into one layer, and attention and MLP outputs into another.
_SINGLE = r"single_transformer_blocks\.\d+\.attn\.(to_qkv_mlp_proj|to_out)"
_DOUBLE_MLP = r"transformer_blocks\.\d+\.(ff|ff_context)\.(linear_in|linear_out)"


@dataclass(frozen=True)
class TinyFlux2Sizes:
    """Sizes of a tiny FLUX.2 ([klein] or [dev]): its real classes at sizes a CPU trains at 64 px in milliseconds a
    step. The text encoder keeps every layer up to the last one read, each tiny; the transformer reads three."""

    seed: int = 0
    num_layers: int = 1
    num_single_layers: int = 1
    attention_head_dim: int = 16
    num_attention_heads: int = 2
    latent_channels: int = 4
    text_hidden: int = 16
    vae_channels: tuple[int, ...] = (8, 16, 16, 16)  # four blocks: 8x downsampling, as FLUX.2's VAE


@dataclass(frozen=True)
class TinyFlux2Spec(TinyFlux2Sizes):
    """A tiny FLUX.2 [klein]."""

    distilled: bool = True  # like FLUX.2-klein-4B and -9B

    @property
    def folder_name(self) -> str:
        return spec_folder_name(f"tiny-flux2-klein-v{TINY_FORMAT}", self)


def tiny_flux2_transformer_and_vae(sizes: TinyFlux2Sizes, text_layers: int, guidance_embeds: bool):
    """A tiny Flux2Transformer2DModel reading `text_layers` stacked text-encoder layers, and its tiny
    AutoencoderKLFlux2, seeded from sizes.seed (the caller forks the random state)."""
    import torch
    from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel

    torch.manual_seed(sizes.seed)
    transformer = Flux2Transformer2DModel(
        patch_size=1, in_channels=sizes.latent_channels * 4, num_layers=sizes.num_layers,
        num_single_layers=sizes.num_single_layers, attention_head_dim=sizes.attention_head_dim,
        num_attention_heads=sizes.num_attention_heads, joint_attention_dim=sizes.text_hidden * text_layers,
        axes_dims_rope=[sizes.attention_head_dim // 4] * 4, guidance_embeds=guidance_embeds)
    torch.manual_seed(sizes.seed + 1)
    vae = AutoencoderKLFlux2(
        in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * len(sizes.vae_channels),
        up_block_types=["UpDecoderBlock2D"] * len(sizes.vae_channels), block_out_channels=sizes.vae_channels,
        layers_per_block=1, latent_channels=sizes.latent_channels, norm_num_groups=4, sample_size=64,
        use_quant_conv=False, use_post_quant_conv=False)
    with torch.no_grad():  # a nearly deterministic posterior, as a trained VAE's (see models/tiny.py)
        vae.encoder.conv_out.bias[sizes.latent_channels:] = -12.0
    return transformer, vae


def build_tiny_flux2(spec: TinyFlux2Spec = TinyFlux2Spec()):
    """The tiny Flux2KleinPipeline, built in memory deterministically from spec.seed."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tokenizer = byte_level_qwen_tokenizer()
    with torch.random.fork_rng(devices=[]):
        transformer, vae = tiny_flux2_transformer_and_vae(spec, len(Flux2.text_layers), guidance_embeds=False)
        torch.manual_seed(spec.seed + 2)
        text_encoder = Qwen3ForCausalLM(Qwen3Config(
            hidden_size=spec.text_hidden, intermediate_size=spec.text_hidden * 2,
            num_hidden_layers=TINY_TEXT_ENCODER_LAYERS,
            num_attention_heads=2, num_key_value_heads=2, head_dim=spec.text_hidden // 2, vocab_size=len(tokenizer),
            max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id))
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)
    return Flux2KleinPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                              transformer=transformer, is_distilled=spec.distilled)


class Flux2(TransformerFamily):
    name = "flux2"
    pipeline_class_name = "Flux2KleinPipeline"
    title = "FLUX.2 [klein]"
    pipeline_guidance = 4.0  # what an undistilled [klein] base draws at
    reference_posterior = "mode"  # train_dreambooth_lora_flux2_klein.py: vae.encode(...).latent_dist.mode()
    # The pipeline's text_encoder_out_layers, which lookalike trains at too so that training reads the prompt as
    # drawing does; the script reads (10, 20, 30) by default ([model] text_encoder_out_layers sets it).
    text_layers = (9, 18, 27)
    components = {"transformer": ("diffusers", "Flux2Transformer2DModel"), "vae": ("diffusers", "AutoencoderKLFlux2"),
                  "scheduler": ("diffusers", "FlowMatchEulerDiscreteScheduler"),
                  "text_encoder": ("transformers", "Qwen3ForCausalLM"), "tokenizer": ("transformers", "AutoTokenizer")}
    text_components = ("text_encoder", "tokenizer")
    bases = {
        # Step-distilled: 4 steps, no guidance (the pipeline ignores it).
        "flux2-klein-4b": BaseModelInfo("flux2", "black-forest-labs/FLUX.2-klein-4B", 512, 4, guidance=False,
                                        architecture=KLEIN_4B_TRANSFORMER, licence="Apache 2.0"),
        "flux2-klein-9b": BaseModelInfo("flux2", "black-forest-labs/FLUX.2-klein-9B", 512, 4, guidance=False,
                                        architecture=KLEIN_9B_TRANSFORMER, licence="non-commercial (FLUX licence)"),
        "tiny-flux2-klein": BaseModelInfo("flux2", None, 32, 4, guidance=False),
    }
    # attention: every attention layer (a single block's two fused layers included); diffusers: the default set of
    # train_dreambooth_lora_flux2_klein.py (the double blocks' image attention, to_q, to_k, to_v and to_out.0, and
    # both layers of every single block); attention+mlp adds the double blocks' feed-forward.
    target_modules = {
        "attention": rf"{_DOUBLE_ATTENTION}|{_SINGLE}",
        "diffusers": rf"transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v|to_out\.0)|{_SINGLE}",
        "attention+mlp": rf"{_DOUBLE_ATTENTION}|{_SINGLE}|{_DOUBLE_MLP}",
    }
    negative_prompt = ""  # what an undistilled model's CFG draws against
    # Measured by bench/activation_figures.py on FLUX.2 [klein] 4B's blocks; the backward pass's working values at
    # FLUX.1's measured ratio to its largest block's figure (11.0 / 13.2).
    activation_figures = {"double": 18.1, "single": 21.1}
    backward_working = 17.5

    def blocks(self, architecture, image_tokens, text_tokens):
        tokens = image_tokens + text_tokens  # both kinds run on the image and text tokens together
        return [("double", tokens)] * architecture["num_layers"] + [("single", tokens)] * architecture[
            "num_single_layers"]

    def owns(self, denoiser_config) -> bool:
        return not denoiser_config.get("guidance_embeds")  # FLUX.2 [dev]'s transformer takes the guidance scale

    def local_info(self, folder: Path) -> BaseModelInfo:
        if is_distilled(folder):
            return BaseModelInfo("flux2", None, 512, 4, guidance=False)
        return BaseModelInfo("flux2", None, 512, 50)

    def ensure_tiny(self, name: str) -> Path:
        return ensure_built(TinyFlux2Spec().folder_name, build_tiny_flux2)

    def text_arguments(self, text: TextEncoding) -> dict[str, Any]:
        return {"max_sequence_length": text.tokens, "text_encoder_out_layers": text.layers or self.text_layers}

    def check_text(self, pipe, text: TextEncoding) -> None:
        config = pipe.text_encoder.config
        depth = getattr(config, "text_config", config).num_hidden_layers  # Mistral 3 nests its language model's
        if text.layers is not None and max(text.layers) > depth:
            raise LookalikeError(f"model.text_encoder_out_layers: {list(text.layers)} reads beyond this base's text "
                                 f"encoder, whose hidden states are numbered 0 to {depth}")

    def encode(self, pipe, caption: str, text: TextEncoding, device) -> dict[str, Any]:
        self.check_text(pipe, text)
        prompt_embeds, _ = pipe.encode_prompt(caption, device=device, **self.text_arguments(text))
        return {"prompt_embeds": prompt_embeds[0]}

    def latent_normalisation(self, folder: Path):
        """The VAE's batch-norm running mean and standard deviation, read from its weights file."""
        import torch
        from safetensors import safe_open

        config = json.loads((Path(folder) / "vae" / "config.json").read_text())
        with safe_open(str(Path(folder) / "vae" / "diffusion_pytorch_model.safetensors"), framework="pt") as weights:
            mean, variance = weights.get_tensor("bn.running_mean"), weights.get_tensor("bn.running_var")
        return mean.float().view(1, -1, 1, 1), torch.sqrt(variance.float().view(1, -1, 1, 1) + config["batch_norm_eps"])

    def model_input(self, latents, normalisation):
        from diffusers import Flux2KleinPipeline

        mean, std = normalisation
        patches = (Flux2KleinPipeline._patchify_latents(latents) - mean) / std
        return Flux2KleinPipeline._pack_latents(patches), patches.shape[-2:]

    def predict(self, transformer, config, noisy, sigmas, texts, guidance, layout, device, dtype):
        import torch
        from diffusers import Flux2KleinPipeline

        batch = len(texts)
        prompt_embeds = torch.stack([t["prompt_embeds"] for t in texts]).to(device, dtype)
        image_ids = Flux2KleinPipeline._prepare_latent_ids(torch.empty(batch, 1, *layout)).to(device)
        prediction = transformer(
            hidden_states=noisy.to(device, dtype),
            timestep=sigmas.to(device),
            guidance=torch.full((batch,), guidance, device=device) if config.guidance_embeds else None,
            encoder_hidden_states=prompt_embeds,
            txt_ids=Flux2KleinPipeline._prepare_text_ids(prompt_embeds).to(device),
            img_ids=image_ids,
            return_dict=False,
        )[0]
        return prediction[:, :noisy.shape[1]]

    def pipeline_embeddings(self, text, negative, device, dtype) -> dict:
        def batch_of_one(embedding):
            return embedding["prompt_embeds"][None].to(device, dtype)

        return {"prompt_embeds": batch_of_one(text),
                "negative_prompt_embeds": None if negative is None else batch_of_one(negative)}
