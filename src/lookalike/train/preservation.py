"""Differential output preservation (train.output_preservation; ai-toolkit's DOP): besides learning the subject,
the LoRA is taught to leave the base's output for the subject's class alone. Each subject example is also run with
its caption's trigger word replaced by the class word ("a photo of sks" -> "a photo of person"), on the same noisy
latents at the same noise level, once through the base with the LoRA switched off (no gradients) and once with it;
the mean squared difference of the two predictions, times the setting, is added to the loss. It needs no class
images, and it keeps "sks next to a person" from drawing two of the subject. No random number is drawn for it, so
a run with it resumes as exactly as one without."""

from __future__ import annotations

from contextlib import contextmanager

import torch


def preserved_caption(caption: str, people) -> str:
    """The caption with each person's trigger word replaced by their class word ("sks man" -> "man", not
    "man man")."""
    for person in people:
        caption = caption.replace(f"{person.token} {person.class_word}", person.class_word)
        caption = caption.replace(person.token, person.class_word)
    return caption


@contextmanager
def lora_off(denoiser):
    """The denoiser as its base is: its adapters disabled inside the block (diffusers' PeftAdapterMixin)."""
    denoiser.disable_adapters()
    try:
        yield
    finally:
        denoiser.enable_adapters()


def preservation_loss(family, transformer, denoiser, noisy, levels, preserved_texts, with_lora, guidance, layout,
                      device, dtype) -> torch.Tensor:
    """The mean squared difference between `with_lora` (the LoRA's predictions for the preserved captions, with
    gradients) and the base's for the same inputs. `transformer`: the model as training calls it (wrapped for
    several processes); `denoiser`: the model itself, whose adapters are switched off."""
    with torch.no_grad(), lora_off(denoiser):
        base = family.predict(transformer, denoiser.config, noisy, levels, preserved_texts, guidance, layout, device,
                              dtype)
    return torch.nn.functional.mse_loss(with_lora.float(), base.float())
