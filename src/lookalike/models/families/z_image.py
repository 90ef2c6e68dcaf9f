"""Z-Image (Tongyi-MAI): ZImagePipeline, a Qwen3 text encoder (its second-to-last hidden states, padding
dropped, so each caption keeps its own length), unpacked latents given to the transformer as a list of
(C, 1, H, W) frames, a timestep of 1 - sigma, and an output that is minus the flow velocity. Generation uses
true classifier-free guidance, against an empty negative prompt."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lookalike.models.families.interface import BaseModelInfo, TextEncoding, TransformerFamily
from lookalike.models.tiny import byte_level_qwen_tokenizer, ensure_built, spec_folder_name, tiny_autoencoder

_ATTENTION = r"attention\.(to_q|to_k|to_v|to_out\.0)"
_BLOCKS = r"(layers|noise_refiner|context_refiner)\.\d+"

# The published transformer of Z-Image and Z-Image-Turbo (6B parameters; cap_feat_dim: Qwen3-4B's hidden size).
Z_IMAGE_TRANSFORMER = dict(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=3840, n_layers=30,
                           n_refiner_layers=2, n_heads=30, n_kv_heads=30, qk_norm=True, cap_feat_dim=2560,
                           rope_theta=256.0, t_scale=1000.0, axes_dims=(32, 48, 48))

TINY_FORMAT = 2  # bump when the tiny model's architecture or tokenizer changes, so old folders are not reused


@dataclass(frozen=True)
class TinyZImageSpec:
    """Sizes of a tiny Z-Image: the real classes, small enough to train at 64 px in milliseconds per step."""

    seed: int = 0
    dim: int = 32
    layers: int = 1
    refiner_layers: int = 1
    heads: int = 2
    text_hidden: int = 16
    text_layers: int = 2
    vae_channels: tuple[int, ...] = (8, 16, 16, 16)  # four blocks: 8x downsampling, as Z-Image's VAE

    @property
    def folder_name(self) -> str:
        return spec_folder_name(f"tiny-z-image-v{TINY_FORMAT}", self)


def build_tiny_z_image(spec: TinyZImageSpec = TinyZImageSpec()):
    """The tiny ZImagePipeline, built in memory deterministically from spec.seed."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    tokenizer = byte_level_qwen_tokenizer()
    head = spec.dim // spec.heads
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        transformer = ZImageTransformer2DModel(
            all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=spec.dim, n_layers=spec.layers,
            n_refiner_layers=spec.refiner_layers, n_heads=spec.heads, n_kv_heads=spec.heads, qk_norm=True,
            cap_feat_dim=spec.text_hidden, axes_dims=[head // 2, head // 4, head // 4], axes_lens=[256, 64, 64])
        with torch.no_grad():  # made with torch.empty: fixed here so that the same seed gives the same model
            transformer.x_pad_token.fill_(1.0)
            transformer.cap_pad_token.fill_(1.0)
        torch.manual_seed(spec.seed + 1)
        vae = tiny_autoencoder(spec.vae_channels, 16)
        torch.manual_seed(spec.seed + 2)
        text_encoder = Qwen3Model(Qwen3Config(
            hidden_size=spec.text_hidden, intermediate_size=spec.text_hidden * 2, num_hidden_layers=spec.text_layers,
            num_attention_heads=2, num_key_value_heads=2, head_dim=spec.text_hidden // 2, vocab_size=len(tokenizer),
            max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id))
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=False)
    return ZImagePipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                          transformer=transformer)


class ZImage(TransformerFamily):
    name = "z-image"
    pipeline_class_name = "ZImagePipeline"
    title = "Z-Image"
    pipeline_guidance = 5.0
    reference_posterior = "mode"  # train_dreambooth_lora_z_image.py: vae.encode(...).latent_dist.mode()
    components = {"transformer": ("diffusers", "ZImageTransformer2DModel"), "vae": ("diffusers", "AutoencoderKL"),
                  "scheduler": ("diffusers", "FlowMatchEulerDiscreteScheduler"),
                  "text_encoder": ("transformers", "Qwen3Model"), "tokenizer": ("transformers", "AutoTokenizer")}
    text_components = ("text_encoder", "tokenizer")
    bases = {
        # The pipeline's own defaults: 50 steps at CFG 5.0; Turbo is distilled to 8 steps without guidance.
        "z-image": BaseModelInfo("z-image", "Tongyi-MAI/Z-Image", 512, 50, architecture=Z_IMAGE_TRANSFORMER,
                                 licence="Apache 2.0"),
        "z-image-turbo": BaseModelInfo("z-image", "Tongyi-MAI/Z-Image-Turbo", 512, 8, guidance=False,
                                       architecture=Z_IMAGE_TRANSFORMER, licence="Apache 2.0"),
        "tiny-z-image": BaseModelInfo("z-image", None, 32, 28),
    }
    # diffusers' train_dreambooth_lora_z_image.py adapts to_q, to_k, to_v and to_out.0 wherever they are: the
    # attention of the main layers and of both refiners. attention+mlp adds the feed-forward (w1, w2, w3).
    target_modules = {
        "attention": rf"{_BLOCKS}\.{_ATTENTION}",
        "diffusers": rf"{_BLOCKS}\.{_ATTENTION}",
        "attention+mlp": rf"{_BLOCKS}\.({_ATTENTION}|feed_forward\.(w1|w2|w3))",
    }
    takes_negative_prompt = True
    negative_prompt = ""  # the pipeline's own negative prompt when none is given
    # Measured by bench/activation_figures.py on Z-Image's blocks (a refiner is the same block as a main layer,
    # without the text); the backward pass's working values at FLUX.1's measured ratio to its largest block's
    # figure (11.0 / 13.2).
    activation_figures = {"layer": 19.1, "refiner": 19.1}
    backward_working = 15.9

    def hidden_size(self, architecture) -> int:
        return architecture["dim"]

    def latent_channels(self, architecture) -> int:
        return architecture["in_channels"]  # patchified inside the transformer

    def text_shapes(self, architecture, tokens):
        return {"prompt_embeds": (tokens, architecture["cap_feat_dim"])}

    def blocks(self, architecture, image_tokens, text_tokens):
        refiners = architecture["n_refiner_layers"]
        return ([("refiner", image_tokens)] * refiners + [("refiner", text_tokens)] * refiners +
                [("layer", image_tokens + text_tokens)] * architecture["n_layers"])

    def local_info(self, folder: Path) -> BaseModelInfo:
        return BaseModelInfo("z-image", None, 512, 50)

    def ensure_tiny(self, name: str) -> Path:
        return ensure_built(TinyZImageSpec().folder_name, build_tiny_z_image)

    def encode(self, pipe, caption: str, text: TextEncoding, device) -> dict[str, Any]:
        embeds, _ = pipe.encode_prompt(caption, device=device, do_classifier_free_guidance=False,
                                       max_sequence_length=text.tokens)
        return {"prompt_embeds": embeds[0]}

    def predict(self, transformer, config, noisy, sigmas, texts, guidance, layout, device, dtype):
        import torch

        frames = list(noisy.to(device, dtype).unsqueeze(2).unbind(0))  # (C, 1, H, W) each
        output = transformer(frames, (1 - sigmas).to(device), [t["prompt_embeds"].to(device, dtype) for t in texts],
                             return_dict=False)[0]
        return -torch.stack(output).squeeze(2)

    def pipeline_embeddings(self, text, negative, device, dtype) -> dict:
        return {"prompt_embeds": [text["prompt_embeds"].to(device, dtype)],
                "negative_prompt_embeds": None if negative is None else [negative["prompt_embeds"].to(device, dtype)]}
