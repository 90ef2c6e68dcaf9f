"""Krea 2: Krea2Pipeline, a single-stream MMDiT (Krea2Transformer2DModel) whose text conditioning is a stack of
hidden states tapped from several layers of a Qwen3-VL text encoder (a text-fusion stage inside the transformer
collapses them), over a fixed-length prompt padded in the middle of its template and masked; Qwen-Image's VAE
(one-frame latents normalised per channel, 2x2-packed tokens); a transformer fed sigma as its timestep that
predicts the flow velocity.

Krea 2 ships as RAW, the non-distilled base LoRAs are trained on (classifier-free guidance, 28 steps), and Turbo,
distilled to 8 steps without guidance (`is_distilled` in its model_index.json, which fixes its timestep shift).
The pipeline's guidance scale g is the extra push away from the negative prompt (prediction + g (prediction -
negative), so 0 is none); lookalike passes the study's guidance scales to it as they are.

A caption's cache keeps only its real tokens (the template's padding dropped) and the mask that places them; the
padding is zeros again when a batch is fed (the transformer attends to no masked token, so their values never
matter: tests/test_families.py checks the loss against the reference script's, padding included)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lookalike.models.families.interface import BaseModelInfo, TextEncoding, TransformerFamily, is_distilled
from lookalike.models.families.qwen_image import QwenImageLatents, tiny_qwen_image_vae
from lookalike.models.tiny import byte_level_qwen_tokenizer, ensure_built, spec_folder_name

# Krea 2's transformer as diffusers' Krea2Transformer2DModel documents its defaults (28 blocks at hidden 6144,
# grouped-query attention, Qwen3-VL-4B's 2560-wide hidden states from 12 of its layers), for `--dry-run` without
# a download.
KREA2_TRANSFORMER = dict(in_channels=64, num_layers=28, attention_head_dim=128, num_attention_heads=48,
                         num_key_value_heads=12, intermediate_size=16384, timestep_embed_dim=256,
                         text_hidden_dim=2560, num_text_layers=12, text_num_attention_heads=20,
                         text_num_key_value_heads=20, text_intermediate_size=6912, num_layerwise_text_blocks=2,
                         num_refiner_text_blocks=2, axes_dims_rope=(32, 48, 48))

# The prompt template's system part, which the pipeline drops as its first 34 tokens (Qwen's tokenizer makes 34 of
# it), and its suffix, which the pipeline counts as 5: the tiny tokenizer has each of these pieces as one token,
# so that it makes as many.
_TEMPLATE_PIECES = ["system", "\n", "Describe", " the", " image", " by", " detailing", " color", ",", " shape",
                    " size", " texture", " quantity", " text", " spatial", " relationships", " of", " objects",
                    " and", " background", ":", "user", "assistant"]
_ATTENTION = r"transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v|to_gate|to_out\.0)"
# The reference script's default layers, by its peft suffixes: a layer whose name is one of these or ends in
# `.` and one of these (the text-fusion blocks' attention and feed-forward included).
_SCRIPT_SUFFIXES = (r"img_in|final_layer\.linear|to_q|to_k|to_v|to_out\.0|to_gate|ff\.up|ff\.down|"
                    r"text_fusion\.projector|txt_in\.linear_1|txt_in\.linear_2|time_embed\.linear_1|"
                    r"time_embed\.linear_2|time_mod_proj")

TINY_FORMAT = 1  # bump when the tiny model's architecture or tokenizer changes, so old folders are not reused


@dataclass(frozen=True)
class TinyKrea2Spec:
    """Sizes of a tiny Krea 2: its real classes (a one-block vision tower included), the text encoder's two layers
    both tapped, small enough to train at 64 px in milliseconds per step. Its blocks keep Krea 2's proportions (a
    key/value head for every 4 query heads, a feed-forward 8/3 as wide as the hidden size), so that the memory
    estimate's figures hold for it too."""

    seed: int = 0
    num_layers: int = 2
    attention_head_dim: int = 12
    num_attention_heads: int = 4
    latent_channels: int = 4
    text_hidden: int = 16
    text_layers: int = 2
    vae_base: int = 8

    @property
    def folder_name(self) -> str:
        return spec_folder_name(f"tiny-krea2-v{TINY_FORMAT}", self)


def krea2_tokenizer():
    """The byte-level Qwen tokenizer with the template's words as tokens, so the template is Qwen's 34 tokens."""
    tokenizer = byte_level_qwen_tokenizer()
    tokenizer.add_tokens(_TEMPLATE_PIECES)
    return tokenizer


def build_tiny_krea2(spec: TinyKrea2Spec = TinyKrea2Spec()):
    """The tiny Krea2Pipeline, built in memory deterministically from spec.seed."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, Krea2Pipeline, Krea2Transformer2DModel
    from transformers import Qwen3VLConfig, Qwen3VLModel

    tokenizer = krea2_tokenizer()
    head, hidden = spec.attention_head_dim, spec.attention_head_dim * spec.num_attention_heads
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        transformer = Krea2Transformer2DModel(
            in_channels=spec.latent_channels * 4, num_layers=spec.num_layers, attention_head_dim=head,
            num_attention_heads=spec.num_attention_heads, num_key_value_heads=spec.num_attention_heads // 4,
            intermediate_size=8 * hidden // 3, timestep_embed_dim=16, text_hidden_dim=spec.text_hidden,
            num_text_layers=spec.text_layers, text_num_attention_heads=2, text_num_key_value_heads=2,
            text_intermediate_size=2 * spec.text_hidden, num_layerwise_text_blocks=1, num_refiner_text_blocks=1,
            axes_dims_rope=(head // 3, head // 3, head // 3))
        torch.manual_seed(spec.seed + 1)
        vae = tiny_qwen_image_vae(spec.vae_base, spec.latent_channels)
        torch.manual_seed(spec.seed + 2)
        text = dict(hidden_size=spec.text_hidden, intermediate_size=spec.text_hidden * 2,
                    num_hidden_layers=spec.text_layers, num_attention_heads=2, num_key_value_heads=2,
                    head_dim=spec.text_hidden // 2, vocab_size=len(tokenizer), max_position_embeddings=1024,
                    pad_token_id=tokenizer.pad_token_id)
        vision = dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=spec.text_hidden,
                      deepstack_visual_indexes=[0], num_position_embeddings=16)
        text_encoder = Qwen3VLModel(Qwen3VLConfig(text_config=text, vision_config=vision))
    # Krea 2's scheduler: the resolution-aware shift its pipeline documents.
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=6400)
    return Krea2Pipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                         transformer=transformer, text_encoder_select_layers=tuple(range(1, spec.text_layers + 1)))


class Krea2(QwenImageLatents, TransformerFamily):
    name = "krea2"
    pipeline_class_name = "Krea2Pipeline"
    title = "Krea 2"
    pipeline_guidance = 4.5
    components = {"transformer": ("diffusers", "Krea2Transformer2DModel"),
                  "vae": ("diffusers", "AutoencoderKLQwenImage"),
                  "scheduler": ("diffusers", "FlowMatchEulerDiscreteScheduler"),
                  "text_encoder": ("transformers", "Qwen3VLModel"),
                  "tokenizer": ("transformers", "AutoTokenizer")}
    text_components = ("text_encoder", "tokenizer")
    bases = {
        # The reference script's recipes: RAW at 28 steps with guidance (its pipeline's example: 4.5), Turbo at 8
        # steps without.
        "krea2-raw": BaseModelInfo("krea2", "krea/Krea-2-Raw", 512, 28, architecture=KREA2_TRANSFORMER),
        "krea2-turbo": BaseModelInfo("krea2", "krea/Krea-2-Turbo", 512, 8, guidance=False,
                                     architecture=KREA2_TRANSFORMER),
        "tiny-krea2": BaseModelInfo("krea2", None, 32, 28),
    }
    # diffusers' train_dreambooth_lora_krea2.py adapts by default the Krea 2 authors' set: the blocks' attention
    # (with its gate) and feed-forward up and down projections, the text-fusion blocks' too, and the input, output,
    # text and timestep projections. attention: the blocks' attention only (what the authors advise for long runs);
    # attention+mlp adds the blocks' SwiGLU feed-forward.
    target_modules = {
        "attention": _ATTENTION,
        "diffusers": rf"(.*\.)?({_SCRIPT_SUFFIXES})",
        "attention+mlp": rf"{_ATTENTION}|transformer_blocks\.\d+\.ff\.(gate|up|down)",
    }
    takes_negative_prompt = True
    negative_prompt = ""  # the pipeline's own negative prompt when none is given
    # Measured by bench/activation_figures.py on Krea 2's blocks; the backward pass's working values from the tiny
    # model's measured step (tests/test_memory.py): FLUX.1's ratio to the block's figure (11.0 / 13.2) gave 15.3,
    # 20% above what it holds.
    activation_figures = {"block": 18.4}
    backward_working = 8.5

    def blocks(self, architecture, image_tokens, text_tokens):
        """The transformer's blocks; its text-fusion blocks run before any layer an attention LoRA adapts, so they
        keep nothing for the backward pass."""
        return [("block", image_tokens + text_tokens)] * architecture["num_layers"]

    def text_shapes(self, architecture, tokens):
        return {"prompt_embeds": (tokens, architecture["num_text_layers"], architecture["text_hidden_dim"]),
                "prompt_embeds_mask": (tokens,)}

    def local_info(self, folder: Path) -> BaseModelInfo:
        if is_distilled(folder):
            return BaseModelInfo("krea2", None, 512, 8, guidance=False)
        return BaseModelInfo("krea2", None, 512, 28)

    def ensure_tiny(self, name: str) -> Path:
        return ensure_built(TinyKrea2Spec().folder_name, build_tiny_krea2)

    def sample_pipeline(self, folder, denoiser, vae, scheduler):
        """With the folder's pipeline settings: which encoder layers it taps, and whether it is distilled (which
        fixes its timestep shift)."""
        index = json.loads((Path(folder) / "model_index.json").read_text())
        settings = {key: index[key] for key in ("text_encoder_select_layers", "is_distilled", "patch_size")
                    if key in index}
        return self.pipeline_class()(scheduler=scheduler, vae=vae, transformer=denoiser, text_encoder=None,
                                     tokenizer=None, **settings)

    def encode(self, pipe, caption: str, text: TextEncoding, device) -> dict[str, Any]:
        embeds, mask = pipe.encode_prompt(caption, device=device, max_sequence_length=text.tokens)
        return {"prompt_embeds": embeds[0][mask[0]], "prompt_embeds_mask": mask[0]}

    def padded(self, text: dict[str, Any]):
        """One caption's (embeddings, mask) at the template's fixed length: its real tokens in place, zeros
        elsewhere."""
        mask = text["prompt_embeds_mask"].bool()
        embeds = text["prompt_embeds"].new_zeros(len(mask), *text["prompt_embeds"].shape[1:])
        embeds[mask] = text["prompt_embeds"]
        return embeds, mask

    def predict(self, transformer, config, noisy, sigmas, texts, guidance, layout, device, dtype):
        import torch
        from diffusers import Krea2Pipeline

        embeds, masks = zip(*(self.padded(text) for text in texts))
        embeds = torch.stack(embeds).to(device, dtype)
        height, width = layout
        return transformer(
            hidden_states=noisy.to(device, dtype),
            encoder_hidden_states=embeds,
            timestep=sigmas.to(device, dtype),
            position_ids=Krea2Pipeline.prepare_position_ids(embeds.shape[1], height // 2, width // 2, device),
            encoder_attention_mask=torch.stack(masks).to(device),
            return_dict=False,
        )[0]

    def pipeline_embeddings(self, text, negative, device, dtype) -> dict:
        embeds, mask = self.padded(text)
        arguments = {"prompt_embeds": embeds[None].to(device, dtype), "prompt_embeds_mask": mask[None].to(device)}
        if negative is not None:
            embeds, mask = self.padded(negative)
            arguments |= {"negative_prompt_embeds": embeds[None].to(device, dtype),
                          "negative_prompt_embeds_mask": mask[None].to(device)}
        return arguments
