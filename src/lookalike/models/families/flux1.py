"""FLUX.1 [dev] and [schnell]: FluxPipeline, a CLIP and a T5 text encoder, 2x2-packed latents, and a
transformer fed sigma as its timestep (and dev's distilled guidance) that predicts the flow velocity."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lookalike.errors import LookalikeError
from lookalike.models.families.interface import (
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
    unigram_t5_tokenizer,
)

CLIP_TOKENS = 77  # FLUX's CLIP prompt length, whatever a tokenizer's config says (as diffusers' scripts do)

# FLUX.1-dev's transformer (12B parameters), for estimates and benchmarks without its weights; schnell's has no
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

MLP_RATIO = 4  # FLUX.1's MLP width over its hidden size: a single block's linear1 is 3 hidden + 4 hidden wide

# kohya and ComfyUI name FLUX.1's layers as Black Forest Labs' checkpoint does, where a double block's q, k and v
# are one fused `qkv` layer and a single block's q, k, v and MLP input are one `linear1`: each such layer -> the
# diffusers layers it fuses, per block kind.
DOUBLE = {"img_attn.qkv": ["attn.to_q", "attn.to_k", "attn.to_v"], "img_attn.proj": ["attn.to_out.0"],
          "img_mlp.0": ["ff.net.0.proj"], "img_mlp.2": ["ff.net.2"], "img_mod.lin": ["norm1.linear"],
          "txt_attn.qkv": ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"],
          "txt_attn.proj": ["attn.to_add_out"], "txt_mlp.0": ["ff_context.net.0.proj"],
          "txt_mlp.2": ["ff_context.net.2"], "txt_mod.lin": ["norm1_context.linear"]}
SINGLE = {"linear1": ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"], "linear2": ["proj_out"],
          "modulation.lin": ["norm.linear"]}
BLOCKS = {"transformer_blocks": ("double_blocks", DOUBLE), "single_transformer_blocks": ("single_blocks", SINGLE)}

_ATTENTION = r"attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
_DOUBLE_BLOCK_MLP = r"ff\.net\.0\.proj|ff\.net\.2|ff_context\.net\.0\.proj|ff_context\.net\.2"
_MLP = rf"{_DOUBLE_BLOCK_MLP}|proj_mlp|proj_out"
_BLOCKS = r"(transformer_blocks|single_transformer_blocks)\.\d+"


TINY_FORMAT = 2  # bump when the tiny model's architecture or tokenizers change, so old folders are not reused


@dataclass(frozen=True)
class TinySpec:
    """Sizes of a tiny FLUX.1 of its real classes. The defaults train at 64 px in milliseconds per step;
    benchmarks use bigger ones."""

    seed: int = 0
    num_layers: int = 1
    num_single_layers: int = 1
    attention_head_dim: int = 16
    num_attention_heads: int = 4
    joint_attention_dim: int = 32
    pooled_projection_dim: int = 32
    latent_channels: int = 16
    vae_channels: tuple[int, ...] = (8, 16, 16, 16)  # four blocks: 8x downsampling, as FLUX's VAE
    text_hidden: int = 32
    guidance_embeds: bool = True  # like FLUX.1-dev, which is guidance-distilled

    @property
    def folder_name(self) -> str:
        return spec_folder_name(f"tiny-flux-v{TINY_FORMAT}", self)


def build_tiny_pipeline(spec: TinySpec = TinySpec()):
    """Build the tiny FluxPipeline in memory, deterministically from spec.seed."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    clip_tokenizer = byte_level_clip_tokenizer()
    t5_tokenizer = unigram_t5_tokenizer()
    rope_rest = (spec.attention_head_dim - spec.attention_head_dim // 4) // 2
    axes = (spec.attention_head_dim - 2 * rope_rest, rope_rest, rope_rest)  # sums to the head dimension

    # Each component gets its own seed so that changing one size leaves the others' weights unchanged.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        transformer = FluxTransformer2DModel(
            patch_size=1,
            in_channels=spec.latent_channels * 4,
            num_layers=spec.num_layers,
            num_single_layers=spec.num_single_layers,
            attention_head_dim=spec.attention_head_dim,
            num_attention_heads=spec.num_attention_heads,
            joint_attention_dim=spec.joint_attention_dim,
            pooled_projection_dim=spec.pooled_projection_dim,
            guidance_embeds=spec.guidance_embeds,
            axes_dims_rope=axes,
        )
        torch.manual_seed(spec.seed + 1)
        vae = tiny_autoencoder(spec.vae_channels, spec.latent_channels)
        torch.manual_seed(spec.seed + 2)
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(clip_tokenizer),
                hidden_size=spec.pooled_projection_dim,
                intermediate_size=spec.pooled_projection_dim * 2,
                num_hidden_layers=1,
                num_attention_heads=2,
                max_position_embeddings=77,
                bos_token_id=clip_tokenizer.bos_token_id,
                eos_token_id=clip_tokenizer.eos_token_id,
                pad_token_id=clip_tokenizer.pad_token_id,
                projection_dim=spec.pooled_projection_dim,
            )
        )
        torch.manual_seed(spec.seed + 3)
        text_encoder_2 = T5EncoderModel(
            T5Config(
                vocab_size=len(t5_tokenizer),
                d_model=spec.joint_attention_dim,
                d_ff=spec.joint_attention_dim * 2,
                d_kv=8,
                num_layers=1,
                num_heads=2,
                relative_attention_num_buckets=8,
                feed_forward_proj="gated-gelu",
                pad_token_id=t5_tokenizer.pad_token_id,
                eos_token_id=t5_tokenizer.eos_token_id,
            )
        )
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
    return FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=t5_tokenizer,
        transformer=transformer,
    )


def ensure_tiny_model(spec: TinySpec = TinySpec(), cache_dir: Path | None = None) -> Path:
    """The folder of the tiny model for `spec`, built and saved on first use, then reused."""
    return ensure_built(spec.folder_name, lambda: build_tiny_pipeline(spec), cache_dir)



class Flux1(TransformerFamily):
    name = "flux1"
    pipeline_class_name = "FluxPipeline"
    title = "FLUX.1"
    pipeline_guidance = 3.5
    distilled_guidance = True
    components = {"transformer": ("diffusers", "FluxTransformer2DModel"), "vae": ("diffusers", "AutoencoderKL"),
                  "scheduler": ("diffusers", "FlowMatchEulerDiscreteScheduler"),
                  "text_encoder": ("transformers", "CLIPTextModel"), "tokenizer": ("transformers", "AutoTokenizer"),
                  "text_encoder_2": ("transformers", "T5EncoderModel"),
                  "tokenizer_2": ("transformers", "AutoTokenizer")}
    text_components = ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")
    # train_dreambooth_lora_flux.py's --train_text_encoder trains the CLIP encoder (kohya's lora_te1); T5 stays
    # frozen, and encodes at every step beside it.
    trainable_text_encoders = {"text_encoder": "lora_te1"}
    published_text_encoders = {"text_encoder": CLIP_L_TEXT, "text_encoder_2": T5_XXL_ENCODER}
    bases = {
        "flux-dev": BaseModelInfo("flux1", "black-forest-labs/FLUX.1-dev", 512, 28, architecture=FLUX_TRANSFORMER,
                                  licence="non-commercial (FLUX.1 [dev] licence)", gated=True),
        # FLUX.1 Krea [dev]: FLUX.1-dev's architecture, trained further for photographic realism (gated too).
        "flux-krea-dev": BaseModelInfo("flux1", "black-forest-labs/FLUX.1-Krea-dev", 512, 28,
                                       architecture=FLUX_TRANSFORMER, guidance_scale=4.5,
                                       licence="non-commercial (FLUX.1 [dev] licence)", gated=True),
        "flux-schnell": BaseModelInfo("flux1", "black-forest-labs/FLUX.1-schnell", 256, 4, guidance=False,
                                      architecture=dict(FLUX_TRANSFORMER, guidance_embeds=False), licence="Apache 2.0"),
        "tiny": BaseModelInfo("flux1", None, 32, 28),
    }
    # A local folder: like FLUX.1-dev, or like schnell when its transformer has no guidance embedding.
    local = BaseModelInfo("flux1", None, 512, 28)
    local_without_guidance = BaseModelInfo("flux1", None, 256, 4, guidance=False)
    # Regexes (peft matches them against full module names) so that the transformer's final proj_out is left
    # out: only layers inside the double-stream and single-stream blocks are adapted. On FLUX.1 (19 double, 38
    # single blocks): attention 266 layers; diffusers 342, the default set of diffusers'
    # train_dreambooth_lora_flux.py (every attention layer and the double blocks' feed-forward); attention+mlp
    # 418 (the single blocks' MLP too).
    target_modules = {
        "attention": rf"{_BLOCKS}\.({_ATTENTION})",
        "diffusers": rf"{_BLOCKS}\.({_ATTENTION}|{_DOUBLE_BLOCK_MLP})",
        "attention+mlp": rf"{_BLOCKS}\.({_ATTENTION}|{_MLP})",
    }

    # Measured on diffusers' FLUX blocks (tests/test_memory.py checks the whole estimate against a measured step);
    # bench/activation_figures.py counts them again. The backward pass's working values: measured while one
    # block runs.
    activation_figures = {"double": 13.2, "single": 11.2}
    backward_working = 11.0
    kohya_base_version = "flux1"
    modelspec_architectures = {"flux-dev": "flux-1-dev/lora", "flux-krea-dev": "flux-1-dev/lora",
                               "flux-schnell": "flux-1-schnell/lora"}

    def route_layout(self, model) -> RouteLayout:
        # Double and single blocks alike take (hidden_states, encoder_hidden_states, temb, image_rotary_emb, ...)
        # and give (encoder_hidden_states, hidden_states), in diffusers' FluxTransformer2DModel.forward, whose
        # rotary embedding covers the text ids, then the image ids.
        return RouteLayout(blocks=[*model.transformer_blocks, *model.single_transformer_blocks],
                           image=("hidden_states", 0), text=("encoder_hidden_states", 1),
                           rotary=("image_rotary_emb", 3))

    def text_shapes(self, architecture, tokens):
        return {"prompt_embeds": (tokens, architecture["joint_attention_dim"]),
                "pooled": (architecture["pooled_projection_dim"],)}

    def blocks(self, architecture, image_tokens, text_tokens):
        tokens = image_tokens + text_tokens  # both kinds run on the image and text tokens together
        return [("double", tokens)] * architecture["num_layers"] + [("single", tokens)] * architecture[
            "num_single_layers"]

    def local_info(self, folder: Path) -> BaseModelInfo:
        try:
            transformer = json.loads((Path(folder) / "transformer" / "config.json").read_text())
        except (OSError, ValueError):
            return self.local  # not there yet (or not readable): loading it will say what is wrong
        return self.local_without_guidance if transformer.get("guidance_embeds") is False else self.local

    def ensure_tiny(self, name: str) -> Path:
        return ensure_tiny_model()

    def adjust_pipeline(self, pipe) -> None:
        # A local folder whose tokenizer leaves model_max_length unset would otherwise tokenize to transformers'
        # 'very large integer' and overflow.
        if getattr(pipe, "tokenizer", None) is not None:
            pipe.tokenizer.model_max_length = CLIP_TOKENS
            pipe.tokenizer_max_length = CLIP_TOKENS

    def encode(self, pipe, caption: str, text: TextEncoding, device) -> dict[str, Any]:
        prompt_embeds, pooled, _ = pipe.encode_prompt(caption, prompt_2=None, device=device,
                                                      max_sequence_length=text.tokens)
        return {"prompt_embeds": prompt_embeds[0], "pooled": pooled[0]}

    def model_input(self, latents, normalisation):
        from diffusers import FluxPipeline

        latents, (height, width) = super().model_input(latents, normalisation)
        return FluxPipeline._pack_latents(latents, len(latents), latents.shape[1], height, width), (height, width)

    def predict(self, transformer, config, noisy, sigmas, texts, guidance, layout, device, dtype):
        import torch
        from diffusers import FluxPipeline

        batch, (height, width) = len(texts), layout
        prompt_embeds = torch.stack([t["prompt_embeds"] for t in texts]).to(device, dtype)
        return transformer(
            hidden_states=noisy.to(device, dtype),
            timestep=sigmas.to(device, dtype),
            guidance=torch.full((batch,), guidance, device=device) if config.guidance_embeds else None,
            pooled_projections=torch.stack([t["pooled"] for t in texts]).to(device, dtype),
            encoder_hidden_states=prompt_embeds,
            txt_ids=torch.zeros(prompt_embeds.shape[1], 3, device=device),
            img_ids=FluxPipeline._prepare_latent_image_ids(batch, height // 2, width // 2, device, dtype),
            return_dict=False,
        )[0]

    def fused_layers(self, modules, alpha):
        """A LoRA of the separate layers becomes one LoRA of the fused layer exactly: the down matrices are stacked
        and the up matrices placed block-diagonally, so each part still only changes its own rows. A part the
        LoRA does not adapt (a single block's MLP input, in an attention-only LoRA) adds no rank: its rows of the
        up matrix are zero, and nothing else of it is written."""
        import torch

        layers = {}
        for name in modules:
            match = re.fullmatch(r"(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)", name)
            kind = BLOCKS.get(match.group(1)) if match else None
            layer = next((bfl for bfl, parts in kind[1].items() if match.group(3) in parts), None) if kind else None
            if layer is None:
                raise LookalikeError(f"cannot export: no kohya/ComfyUI name for the layer {name}")
            layers.setdefault(f"{kind[0]}.{match.group(2)}.{layer}", (match.group(1), match.group(2), layer))
        exported = {}
        for bfl_name, (block, index, layer) in sorted(layers.items()):
            parts = BLOCKS[block][1][layer]
            present = [modules.get(f"{block}.{index}.{part}") for part in parts]
            hidden = next(down for down, _ in filter(None, present)).shape[1]  # every fused part reads the hidden state
            downs, ups = [], []
            for part, found in zip(parts, present):
                # The output width of a part the LoRA does not adapt (its rows are zero).
                width = hidden * MLP_RATIO if part == "proj_mlp" else hidden
                down, up = found if found is not None else (torch.zeros(0, hidden), torch.zeros(width, 0))
                downs.append(down.float())
                ups.append(up.float())
            # kohya scales by alpha / (its rank): n adapted parts of rank r each keep alpha / r with alpha x n.
            adapted = sum(found is not None for found in present)
            exported[bfl_name] = (torch.cat(downs), torch.block_diag(*ups), alpha * adapted)
        return exported

    def pipeline_embeddings(self, text, negative, device, dtype) -> dict:
        return {"prompt_embeds": text["prompt_embeds"][None].to(device, dtype),
                "pooled_prompt_embeds": text["pooled"][None].to(device, dtype)}
