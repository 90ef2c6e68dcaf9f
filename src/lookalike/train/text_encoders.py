"""Training the text encoders too (train.train_text_encoder; FLUX.1's CLIP, SD 1.x, SDXL and SD3's CLIPs): a LoRA on
each of the family's trainable text encoders, on the attention's q, k, v and out projections as diffusers' reference
scripts add it with --train_text_encoder (the others, FLUX.1's and SD3's T5, stay frozen and encode beside them).
The captions are then encoded at every step, through the pipeline's own encode_prompt (so as generation encodes
them), instead of once into the cache.

TrainedTextEncoders stands where the trainer otherwise holds the cached embeddings: `texts[caption]` is the
caption's embeddings, named as the family caches them, with gradients to the LoRA while training.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lookalike.errors import LookalikeError
from lookalike.models.base import load_pipeline
from lookalike.models.families import FAMILIES
from lookalike.models.families.interface import TextEncoding
from lookalike.models.lora import component_of, text_layer_in_file, text_layer_in_model

# The layers diffusers' reference scripts (train_dreambooth_lora.py, _sdxl.py, _flux.py) adapt in a CLIP text encoder.
TEXT_ENCODER_LAYERS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def text_encoder_lora_config(t):
    """The LoRA a run's text encoders train (the reference scripts' layers, the run's rank, alpha and dropout)."""
    from peft import LoraConfig

    return LoraConfig(r=t.rank, lora_alpha=t.lora_alpha, lora_dropout=t.lora_dropout, init_lora_weights="gaussian",
                      target_modules=TEXT_ENCODER_LAYERS)


def check_trainable(family) -> None:
    """Refuse train_text_encoder for a family whose text encoders lookalike does not train."""
    if not family.trainable_text_encoders:
        trained = ", ".join(sorted(f.name for f in FAMILIES.values() if f.trainable_text_encoders))
        raise LookalikeError(f"train.train_text_encoder: lookalike trains the text encoders of the bases of "
                             f"{trained} (their CLIPs), as their reference scripts' --train_text_encoder does, and "
                             f"this base is {family.name}'s: set train_text_encoder = false")


class TrainedTextEncoders:
    """The base's text encoders on the device, frozen, with a trainable LoRA on each of the family's trainable ones."""

    def __init__(self, folder: Path, family, t, device: torch.device, dtype: torch.dtype, text: TextEncoding):
        check_trainable(family)
        self.family = family
        self.device = device
        self.text = text
        self.pipe = load_pipeline(folder, dtype=dtype, vae=None, **{family.denoiser: None}).to(device)
        for component in self.pipe.components.values():  # frozen, and (as loaded) in eval mode: FLUX.1's T5 stays so
            if isinstance(component, torch.nn.Module):
                component.requires_grad_(False)
        self.encoders = {name: getattr(self.pipe, name) for name in family.trainable_text_encoders}
        self.configs = {}
        for name, encoder in self.encoders.items():
            self.configs[name] = text_encoder_lora_config(t)
            encoder.add_adapter(self.configs[name])
            for parameter in encoder.parameters():
                if parameter.requires_grad:  # the LoRA's weights stay in float32 under mixed precision
                    parameter.data = parameter.data.float()
        self.train()

    def __getitem__(self, caption: str) -> dict[str, torch.Tensor]:
        """The caption's embeddings through the text encoders as they are now (with gradients where enabled)."""
        return self.family.encode(self.pipe, caption, self.text, self.device)

    def parameters(self) -> list[torch.Tensor]:
        return [p for encoder in self.encoders.values() for p in encoder.parameters() if p.requires_grad]

    def average_gradients(self, accelerator) -> None:
        """Average the LoRA's gradients across processes, as data parallelism does the denoiser's: every process
        encoded its own rows of the batch."""
        for parameter in self.parameters():
            if parameter.grad is not None:
                parameter.grad = accelerator.reduce(parameter.grad, reduction="mean")

    def train(self) -> None:
        for encoder in self.encoders.values():
            encoder.train()

    def eval(self) -> None:
        for encoder in self.encoders.values():
            encoder.eval()

    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        """The LoRA's tensors, named as diffusers' layout names them (text_encoder.text_model.<module>.lora_A.weight):
        a copy on the CPU."""
        from peft.utils import get_peft_model_state_dict

        return {f"{name}.{text_layer_in_file(key)}": tensor.detach().to("cpu", copy=True).contiguous()
                for name, encoder in self.encoders.items()
                for key, tensor in get_peft_model_state_dict(encoder).items()}

    def load_lora(self, tensors: dict[str, Any]) -> None:
        """Set the LoRA from tensors named as lora_state_dict names them (a checkpoint's)."""
        from peft.utils import set_peft_model_state_dict

        for name, encoder in self.encoders.items():
            mine = {text_layer_in_model(encoder, key.removeprefix(f"{name}.")): value for key, value in tensors.items()
                    if component_of(key) == name}
            set_peft_model_state_dict(encoder, mine)
