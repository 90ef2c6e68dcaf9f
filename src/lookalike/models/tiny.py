"""What the tiny offline models of every family share: where they are kept, how they are built once, and the
small parts several families use (a tiny AutoencoderKL, byte-level CLIP and Qwen tokenizers).

A tiny model is its family's real classes at sizes a CPU trains in seconds, built deterministically from a seed
(the same seed gives the same weights, bit for bit) by its family's module (models/families/), saved once as an
ordinary diffusers folder under the lookalike cache, and reused; so every loading path a hub model takes
(from_pretrained of each component, LoRA loading, diffusers' own training scripts) is exercised for real.
"""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path

from lookalike.workspace import build_once


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


def tiny_clip_text_encoder(tokenizer, hidden: int, projection: bool, layers: int = 2):
    """A tiny CLIP text encoder of `layers` layers (SDXL and SD3 read the second-to-last), with a projection of its
    pooled output where the pipeline reads one (SDXL's second encoder, both of SD3's)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 2,
                            num_hidden_layers=layers, num_attention_heads=2, max_position_embeddings=77,
                            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id, projection_dim=hidden)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def unigram_t5_tokenizer():
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
