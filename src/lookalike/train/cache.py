"""Text embeddings and VAE latents, computed once and cached on disk, keyed by what produced them.

A key hashes the component's configuration and the exact input (image bytes and size; caption and
token length), so a changed photo, caption or model gets a new entry and an unchanged one is never redone.
The encoders are loaded only when something is missing, and released as soon as the encoding is done.
"""

from __future__ import annotations

import gc
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from lookalike.data.crop import Size
from lookalike.data.dataset import TrainingImage, load_training_image
from lookalike.generate import offload_pipeline
from lookalike.models.base import component_fingerprint, load_component, load_pipeline, weight_bytes
from lookalike.models.families import folder_family
from lookalike.models.families.interface import TextEncoding
from lookalike.workspace import atomic_path, file_sha256


@dataclass(frozen=True)
class LatentStats:
    """The VAE's posterior for one image."""

    mean: torch.Tensor
    std: torch.Tensor

    def latent(self, generator: torch.Generator, posterior: str) -> torch.Tensor:
        """One training latent: the posterior's mode (its mean), or a new draw mean + std * noise from
        `generator` (train.vae_posterior)."""
        if posterior == "mode":
            return self.mean
        return self.mean + self.std * torch.randn(self.mean.shape, generator=generator)


def _key(*parts: object) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(str(part).encode())
        digest.update(b"\0")
    return digest.hexdigest()[:32]


def _save(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))


def _load(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def _release(*modules) -> None:
    del modules
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class EmbeddingCache:
    """The cache folder of a workspace for one base model folder."""

    def __init__(self, cache_dir: Path, model_folder: Path, device: torch.device, dtype: torch.dtype,
                 offload: bool = False):
        self.cache_dir = cache_dir
        self.model_folder = model_folder
        self.family = folder_family(model_folder)
        self.device = device
        self.dtype = dtype
        self.offload = offload  # [train] offload: the text encoders run block by block too

    def latent_path(self, image: TrainingImage, size: Size) -> Path:
        # A mirrored example is other pixels (its key alone says so: the others' keys stay as they were).
        key = _key(component_fingerprint(self.model_folder, "vae"), file_sha256(image.path), *size,
                   *(["mirrored"] if image.mirrored else []))
        return self.cache_dir / "latents" / f"{key}.safetensors"

    def text_path(self, caption: str, text: TextEncoding) -> Path:
        fingerprints = [component_fingerprint(self.model_folder, c) for c in self.family.text_components]
        # Layers only when chosen: the embeddings cached before the choice existed keep their keys.
        key = _key(self.family.name, *fingerprints, caption, text.tokens, *([list(text.layers)] if text.layers else []))
        return self.cache_dir / "text" / f"{key}.safetensors"

    def latents(self, images: list[TrainingImage], sizes: list[Size]) -> list[LatentStats]:
        """Posterior mean and std for every image at its size; the VAE is loaded only if one is missing."""
        paths = [self.latent_path(image, size) for image, size in zip(images, sizes)]
        missing = [(image, size, path) for image, size, path in zip(images, sizes, paths) if not path.exists()]
        if missing:
            # A VAE that overflows in float16 (SDXL's says force_upcast) encodes in float32, as its pipeline does.
            upcast = json.loads((self.model_folder / "vae" / "config.json").read_text()).get("force_upcast", False)
            dtype = torch.float32 if self.dtype == torch.float16 and upcast else self.dtype
            vae = load_component(self.model_folder, "vae", dtype=dtype).to(self.device)
            for image, size, path in missing:
                pixels = _to_tensor(load_training_image(image, size)).to(self.device, dtype)
                with torch.no_grad():
                    mean, std = self.family.encode_pixels(vae, pixels)
                _save(path, {"mean": mean.float().cpu(), "std": std.float().cpu()})
            _release(vae)
        return [LatentStats(**_load(path)) for path in paths]

    def text_encoders_fit(self) -> bool:
        """Whether the text encoders fit the GPU's free memory whole, with a tenth of it left for their work. Those
        that do not (FLUX.2 [dev]'s Mistral Small 3.1 takes 48 GB in bf16) run block by block: slower, but a GPU
        that trains the quantised base also encodes its captions."""
        if self.device.type != "cuda":
            return True
        needed = sum(weight_bytes(self.model_folder, component, self.dtype)
                     for component in self.family.text_components)
        free, _ = torch.cuda.mem_get_info(self.device)
        return needed <= 0.9 * free

    def texts(self, captions: list[str], text: TextEncoding) -> dict[str, dict[str, torch.Tensor]]:
        """Embeddings of every caption, as the family encodes them (named tensors); the text encoders are loaded
        only if one is missing."""
        paths = {caption: self.text_path(caption, text) for caption in dict.fromkeys(captions)}
        missing = [caption for caption, path in paths.items() if not path.exists()]
        if missing:
            encoder = load_pipeline(self.model_folder, dtype=self.dtype, vae=None, **{self.family.denoiser: None})
            if self.offload or not self.text_encoders_fit():
                offload_pipeline(encoder, self.device)
            else:
                encoder.to(self.device)
            for caption in missing:
                with torch.no_grad():
                    encoded = self.family.encode(encoder, caption, text, self.device)
                _save(paths[caption], {name: tensor.float().cpu() for name, tensor in encoded.items()})
            _release(encoder)
        return {caption: _load(path) for caption, path in paths.items()}


def _to_tensor(image) -> torch.Tensor:
    """A PIL RGB image as a (3, H, W) tensor in [-1, 1], as the VAE expects."""
    import numpy as np

    array = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0)
    return array.permute(2, 0, 1)
