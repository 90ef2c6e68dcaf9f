"""A tiny FluxPipeline built offline: the same classes as FLUX.1-dev, at sizes a CPU trains in seconds.

It is built deterministically from a seed (the same seed gives the same weights, bit for bit), saved once as
an ordinary diffusers folder under the lookalike cache, and reused; so every loading path that FLUX.1-dev
takes (from_pretrained of each component, LoRA loading, diffusers' own training script) is exercised for real.
The other families' tiny models (models/families/) are built and kept the same way, with the helpers here.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

from lookalike.workspace import build_once

TINY_FORMAT = 2  # bump when the architecture or tokenizers below change, so old cached folders are not reused


@dataclass(frozen=True)
class TinySpec:
    """Sizes of a tiny FLUX. The defaults train at 64 px in milliseconds per step; benchmarks use bigger ones."""

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


def spec_folder_name(kind: str, spec) -> str:
    """A tiny model's folder name: its kind and format, then every size of its spec (other sizes, other folder)."""
    return kind + "-" + "-".join(str(v).replace(", ", "_").strip("()") for v in asdict(spec).values())


def default_cache_dir() -> Path:
    """Where built models are kept: $LOOKALIKE_HOME, else ~/.cache/lookalike."""
    return Path(os.environ.get("LOOKALIKE_HOME", Path.home() / ".cache" / "lookalike")) / "models"


def ensure_built(folder_name: str, build, cache_dir: Path | None = None) -> Path:
    """The folder of a tiny pipeline, `build()` and saved on first use, then reused."""
    return build_once((cache_dir or default_cache_dir()) / folder_name, "model_index.json",
                      lambda tmp: build().save_pretrained(tmp, safe_serialization=True))


def tiny_autoencoder(channels: tuple[int, ...], latent_channels: int):
    """A tiny AutoencoderKL, the VAE class of FLUX.1 and Z-Image: one block per entry of `channels` (four:
    8x downsampling, as theirs)."""
    import torch
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * len(channels),
        up_block_types=["UpDecoderBlock2D"] * len(channels),
        block_out_channels=channels,
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=4,
        sample_size=64,
        # Like FLUX's constants for its VAE, these give the tiny VAE's latents of photos about unit variance.
        scaling_factor=3.0,
        shift_factor=0.0,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    with torch.no_grad():
        # A trained VAE's posterior is nearly deterministic; a random one's has std 1, which would bury the
        # image under sampling noise. Set the log-variance output low, as training would.
        vae.encoder.conv_out.bias[latent_channels:] = -12.0
    return vae


def byte_level_clip_tokenizer():
    """A CLIPTokenizer over a byte-level vocab.json and an empty merges.txt: every character is a token."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    symbols = list(bytes_to_unicode().values())
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for symbol in symbols:
        vocab[symbol] = len(vocab)
    for symbol in symbols:  # CLIP's BPE marks the last character of a word with </w>
        vocab[symbol + "</w>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def _unigram_t5_tokenizer():
    """A T5TokenizerFast over a small Unigram vocabulary (characters, with and without the word marker)."""
    import string

    from transformers import T5TokenizerFast

    characters = string.ascii_letters + string.digits + string.punctuation
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [(c, -3.0) for c in characters] + [("\u2581" + c, -2.5) for c in characters]
    return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=512)


QWEN_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Qwen's ChatML, the layout of the prompt the pipeline builds with apply_chat_template.
QWEN_CHAT_TEMPLATE = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
                      "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def byte_level_qwen_tokenizer():
    """A Qwen2TokenizerFast over a byte-level BPE vocabulary with no merges (every byte is a token), Qwen's
    special tokens and its chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import Qwen2TokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {symbol: index for index, symbol in enumerate(bytes_to_unicode().values())}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    fast = Qwen2TokenizerFast(tokenizer_object=tokenizer, unk_token=None, pad_token=QWEN_SPECIAL_TOKENS[0],
                              eos_token=QWEN_SPECIAL_TOKENS[2], model_max_length=512)
    fast.add_special_tokens({"additional_special_tokens": QWEN_SPECIAL_TOKENS[1:]})
    fast.chat_template = QWEN_CHAT_TEMPLATE
    return fast


def build_tiny_pipeline(spec: TinySpec = TinySpec()):
    """Build the tiny FluxPipeline in memory, deterministically from spec.seed."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    clip_tokenizer = byte_level_clip_tokenizer()
    t5_tokenizer = _unigram_t5_tokenizer()
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
