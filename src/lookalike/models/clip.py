"""CLIP for prompt adherence: a hub model (the study's openai/clip-vit-large-patch14), a local folder, or
`tiny`, a random CLIPModel with a byte-level tokenizer built offline, saved once under the lookalike cache."""

from __future__ import annotations

from pathlib import Path

from lookalike.errors import LookalikeError
from lookalike.models.tiny import byte_level_clip_tokenizer, default_cache_dir
from lookalike.workspace import build_once

TINY_CLIP = "tiny-clip-v1"


def build_tiny_clip(seed: int = 0):
    """A tiny random CLIPModel and its CLIPProcessor, deterministic from the seed."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    tokenizer = byte_level_clip_tokenizer()
    text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                  patch_size=8)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).eval()
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return model, CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)


def _tiny_clip_folder() -> Path:
    def save(folder: Path) -> None:
        model, processor = build_tiny_clip()
        model.save_pretrained(folder)
        processor.save_pretrained(folder)

    return build_once(default_cache_dir() / TINY_CLIP, "config.json", save)


def load_clip(name: str):
    """(model, processor) for a hub name, a local folder, or `tiny`."""
    from transformers import CLIPModel, CLIPProcessor

    source = str(_tiny_clip_folder()) if name == "tiny" else name
    try:
        return CLIPModel.from_pretrained(source).eval(), CLIPProcessor.from_pretrained(source)
    except OSError as error:
        raise LookalikeError(f"evaluate.clip_model: cannot load {name!r} ({str(error).splitlines()[0]}); "
                             "download it once with network access, or name a local folder") from None
