"""Stable Diffusion 3 and 3.5: StableDiffusion3Pipeline, an MMDiT (SD3Transformer2DModel) on unpacked 16-channel
latents, fed the noise level as a DDPM-style timestep (sigma x 1000), that predicts the flow velocity. Three text
encoders: two CLIPs (CLIP ViT-L and OpenCLIP bigG, the second-to-last hidden states of each side by side, padded
to T5's width, followed by T5-XXL's tokens) and the two CLIPs' pooled embeddings side by side. Generation uses
classifier-free guidance against the empty negative prompt.

Training follows diffusers' train_dreambooth_lora_sd3.py, which preconditions the transformer's output (its
default --precondition_outputs 1): the loss compares the clean latents the prediction implies with the real ones
(train/objectives.py)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lookalike.models.families.interface import (
    CLIP_BIG_G_TEXT,
    CLIP_L_TEXT,
    T5_XXL_ENCODER,
    BaseModelInfo,
    RouteLayout,
    TextEncoding,
    TransformerFamily,
)
from lookalike.models.tiny import (
    byte_level_clip_tokenizer,
    ensure_built,
    spec_folder_name,
    tiny_autoencoder,
    tiny_clip_text_encoder,
    unigram_t5_tokenizer,
)

CLIP_TOKENS = 77  # both CLIP encoders' prompt length: the CLIP part of every prompt embedding
T5_TOKENS = 256  # the pipeline's own max_sequence_length

# The published transformers (transformer/config.json): SD3.5 Large (8.1B parameters), SD3.5 Medium (2.2B; the
# MMDiT-X, whose first 13 blocks add a second self-attention over the image) and SD3 Medium (2.0B).
SD35_LARGE_TRANSFORMER = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=38, attention_head_dim=64,
                              num_attention_heads=38, joint_attention_dim=4096, caption_projection_dim=2432,
                              pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192,
                              dual_attention_layers=(), qk_norm="rms_norm")
SD35_MEDIUM_TRANSFORMER = dict(SD35_LARGE_TRANSFORMER, num_layers=24, num_attention_heads=24,
                               caption_projection_dim=1536, pos_embed_max_size=384,
                               dual_attention_layers=tuple(range(13)))
SD3_MEDIUM_TRANSFORMER = dict(SD35_LARGE_TRANSFORMER, num_layers=24, num_attention_heads=24,
                              caption_projection_dim=1536, qk_norm=None)

_PROJECTIONS = r"(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
_BLOCK = r"transformer_blocks\.\d+"
_MLP = r"ff\.net\.0\.proj|ff\.net\.2|ff_context\.net\.0\.proj|ff_context\.net\.2"
_ATTENTION2 = r"attn2\.(to_q|to_k|to_v|to_out\.0)"  # SD3.5 Medium's dual-attention blocks: a second image attention

# The transformer's repeated block, which diffusers' SD3Transformer2DModel does not name (its _repeated_blocks is
# empty): what gradient checkpointing, offloading, sharding and regional compilation work block by block on.
BLOCK_CLASSES = ["JointTransformerBlock"]

TINY_FORMAT = 1  # bump when the tiny model's architecture or tokenizers change, so old folders are not reused


@dataclass(frozen=True)
class TinySD3Spec:
    """Sizes of a tiny SD3 of the real classes: two blocks, the second with SD3.5 Medium's second attention (as
    its blocks after the first have, whose input already depends on the LoRA)."""

    seed: int = 0
    layers: int = 2
    dual_attention_layers: tuple[int, ...] = (1,)
    heads: int = 2
    head_dim: int = 8
    clip_hidden: int = 16  # each CLIP's width: side by side they are the pooled embedding's
    t5_hidden: int = 32  # T5's width: the text tokens' (joint_attention_dim), at least both CLIPs' together
    vae_channels: tuple[int, ...] = (8, 16, 16, 16)  # four blocks: 8x downsampling, as SD3's VAE

    @property
    def folder_name(self) -> str:
        return spec_folder_name(f"tiny-sd3-v{TINY_FORMAT}", self)


def build_tiny_sd3(spec: TinySD3Spec = TinySD3Spec()):
    """The tiny StableDiffusion3Pipeline, built in memory deterministically from spec.seed."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import T5Config, T5EncoderModel

    clip_tokenizer = byte_level_clip_tokenizer()
    t5_tokenizer = unigram_t5_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        transformer = SD3Transformer2DModel(
            sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=spec.layers,
            attention_head_dim=spec.head_dim, num_attention_heads=spec.heads, joint_attention_dim=spec.t5_hidden,
            caption_projection_dim=spec.heads * spec.head_dim, pooled_projection_dim=2 * spec.clip_hidden,
            pos_embed_max_size=96, dual_attention_layers=spec.dual_attention_layers, qk_norm="rms_norm")
        torch.manual_seed(spec.seed + 1)
        vae = tiny_autoencoder(spec.vae_channels, 16)
        torch.manual_seed(spec.seed + 2)
        text_encoder = tiny_clip_text_encoder(clip_tokenizer, spec.clip_hidden, projection=True)
        torch.manual_seed(spec.seed + 3)
        text_encoder_2 = tiny_clip_text_encoder(clip_tokenizer, spec.clip_hidden, projection=True)
        torch.manual_seed(spec.seed + 4)
        text_encoder_3 = T5EncoderModel(T5Config(
            vocab_size=len(t5_tokenizer), d_model=spec.t5_hidden, d_ff=spec.t5_hidden * 2, d_kv=8, num_layers=1,
            num_heads=2, relative_attention_num_buckets=8, feed_forward_proj="gated-gelu",
            pad_token_id=t5_tokenizer.pad_token_id, eos_token_id=t5_tokenizer.eos_token_id))
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)  # SD3's own: a fixed shift, no dynamic shifting
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=clip_tokenizer,
        text_encoder_2=text_encoder_2, tokenizer_2=clip_tokenizer, text_encoder_3=text_encoder_3,
        tokenizer_3=t5_tokenizer)


class StableDiffusion3(TransformerFamily):
    name = "sd3"
    pipeline_class_name = "StableDiffusion3Pipeline"
    title = "SD3 and 3.5"
    pipeline_guidance = 7.0
    objective_kind = "preconditioned_flow_matching"  # the script's default --precondition_outputs 1
    reference_sampling = "logit_normal"  # train_dreambooth_lora_sd3.py: --weighting_scheme logit_normal
    components = {"transformer": ("diffusers", "SD3Transformer2DModel"), "vae": ("diffusers", "AutoencoderKL"),
                  "scheduler": ("diffusers", "FlowMatchEulerDiscreteScheduler"),
                  "text_encoder": ("transformers", "CLIPTextModelWithProjection"),
                  "tokenizer": ("transformers", "CLIPTokenizer"),
                  "text_encoder_2": ("transformers", "CLIPTextModelWithProjection"),
                  "tokenizer_2": ("transformers", "CLIPTokenizer"),
                  "text_encoder_3": ("transformers", "T5EncoderModel"),
                  "tokenizer_3": ("transformers", "T5TokenizerFast")}
    text_components = ("text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2", "tokenizer_3")
    bases = {
        # Steps and guidance scales as each model card advises (SD3 Medium's: the pipeline's 7.0).
        "sd3.5-large": BaseModelInfo("sd3", "stabilityai/stable-diffusion-3.5-large", T5_TOKENS, 28,
                                     architecture=SD35_LARGE_TRANSFORMER, guidance_scale=3.5,
                                     licence="Stability AI Community License", gated=True),
        "sd3.5-medium": BaseModelInfo("sd3", "stabilityai/stable-diffusion-3.5-medium", T5_TOKENS, 40,
                                      architecture=SD35_MEDIUM_TRANSFORMER, guidance_scale=4.5,
                                      licence="Stability AI Community License", gated=True),
        "sd3-medium": BaseModelInfo("sd3", "stabilityai/stable-diffusion-3-medium-diffusers", T5_TOKENS, 28,
                                    architecture=SD3_MEDIUM_TRANSFORMER,
                                    licence="Stability AI Community License", gated=True),
        "tiny-sd3": BaseModelInfo("sd3", None, 32, 28),
    }
    # diffusers' train_dreambooth_lora_sd3.py adapts, by default, every block's joint attention: the image's
    # to_q/k/v/out.0 and the text's add_q/k/v_proj and to_add_out (its peft suffixes `attn.<layer>`). attention
    # adds SD3.5 Medium's second attention over the image (attn2, in its dual-attention blocks), which ComfyUI's
    # SD3 key map places in x_block.attn2's fused qkv and proj; attention+mlp adds both streams' feed-forward.
    target_modules = {
        "attention": rf"{_BLOCK}\.(attn\.{_PROJECTIONS}|{_ATTENTION2})",
        "diffusers": rf"{_BLOCK}\.attn\.{_PROJECTIONS}",
        "attention+mlp": rf"{_BLOCK}\.(attn\.{_PROJECTIONS}|{_ATTENTION2}|{_MLP})",
    }
    # The single-file checkpoints beside the diffusers folders (ComfyUI's: the model and its text encoders).
    hub_ignore = ["sd3*.safetensors", "text_encoders/*"]
    takes_negative_prompt = True
    negative_prompt = ""  # the pipeline's own negative prompt when none is given
    # The script's --train_text_encoder trains both CLIPs (T5 stays frozen), named in kohya's way as SDXL's are.
    trainable_text_encoders = {"text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}
    published_text_encoders = {"text_encoder": CLIP_L_TEXT, "text_encoder_2": CLIP_BIG_G_TEXT,
                               "text_encoder_3": T5_XXL_ENCODER}
    modelspec_architectures = {"sd3-medium": "stable-diffusion-3-m/lora",
                               "sd3.5-large": "stable-diffusion-3-5-large/lora"}
    # Measured by bench/activation_figures.py on SD3.5 Medium's blocks: a joint block, and one with the second
    # attention; the backward pass's working values at FLUX.1's measured ratio to its double block's figure
    # (11.0 / 13.2).
    activation_figures = {"joint": 17.6, "dual": 22.5}
    backward_working = 14.7

    def route_layout(self, model) -> RouteLayout:
        # Its joint blocks take (hidden_states, encoder_hidden_states, temb, ...) and give (encoder_hidden_states,
        # hidden_states), in diffusers' SD3Transformer2DModel.forward; positions are added before the blocks.
        return RouteLayout(blocks=list(model.transformer_blocks), image=("hidden_states", 0),
                           text=("encoder_hidden_states", 1))

    def local_info(self, folder: Path) -> BaseModelInfo:
        return BaseModelInfo("sd3", None, T5_TOKENS, 28)

    def adjust_denoiser(self, denoiser) -> None:
        denoiser._repeated_blocks = BLOCK_CLASSES

    def checkpointed_block_types(self, model) -> set[str]:
        return set(BLOCK_CLASSES)

    def ensure_tiny(self, name: str) -> Path:
        return ensure_built(TinySD3Spec().folder_name, build_tiny_sd3)

    def latent_channels(self, architecture) -> int:
        return architecture["in_channels"]  # patchified inside the transformer

    def text_shapes(self, architecture, tokens):
        return {"prompt_embeds": (CLIP_TOKENS + tokens, architecture["joint_attention_dim"]),
                "pooled": (architecture["pooled_projection_dim"],)}

    def blocks(self, architecture, image_tokens, text_tokens):
        """Every block runs on the image tokens and the prompt's, whose CLIP part is 77 tokens before T5's."""
        dual = set(architecture.get("dual_attention_layers") or ())
        return [("dual" if index in dual else "joint", image_tokens + CLIP_TOKENS + text_tokens)
                for index in range(architecture["num_layers"])]

    def encode(self, pipe, caption: str, text: TextEncoding, device) -> dict[str, Any]:
        embeds, _, pooled, _ = pipe.encode_prompt(caption, prompt_2=None, prompt_3=None, device=device,
                                                  do_classifier_free_guidance=False,
                                                  max_sequence_length=text.tokens)
        return {"prompt_embeds": embeds[0], "pooled": pooled[0]}

    def predict(self, transformer, config, noisy, sigmas, texts, guidance, layout, device, dtype):
        import torch

        return transformer(
            hidden_states=noisy.to(device, dtype),
            timestep=(sigmas * 1000).to(device),  # the scheduler's timesteps: sigma x num_train_timesteps
            encoder_hidden_states=torch.stack([t["prompt_embeds"] for t in texts]).to(device, dtype),
            pooled_projections=torch.stack([t["pooled"] for t in texts]).to(device, dtype),
            return_dict=False,
        )[0]

    def pipeline_embeddings(self, text, negative, device, dtype) -> dict:
        arguments = {"prompt_embeds": text["prompt_embeds"][None].to(device, dtype),
                     "pooled_prompt_embeds": text["pooled"][None].to(device, dtype)}
        if negative is not None:
            arguments |= {"negative_prompt_embeds": negative["prompt_embeds"][None].to(device, dtype),
                          "negative_pooled_prompt_embeds": negative["pooled"][None].to(device, dtype)}
        return arguments
