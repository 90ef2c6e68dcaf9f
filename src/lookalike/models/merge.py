"""Exact LoRA merging: one file whose weight change is a·ΔA + b·ΔB, by concatenating the two LoRAs' ranks.

A LoRA changes a weight by ΔW = (alpha / r) · B @ A. Stacking the two A matrices (rA + rB rows) and putting
a · (alphaA / rA) · B_A and b · (alphaB / rB) · B_B side by side gives B_M @ A_M = a·ΔA + b·ΔB exactly; the
merged file stores alpha = rank, so its own scale is 1. A module only one LoRA adapts gets zero rows from
the other, so every module has the same rank (diffusers and peft then load it as one plain adapter). The text
encoders' LoRAs of runs that trained them (train_text_encoder) merge alike.
"""

from __future__ import annotations

from pathlib import Path

from lookalike.errors import LookalikeError
from lookalike.models.lora import (
    TEXT_ENCODERS,
    denoiser_of,
    modules_of,
    read_lora,
    save_lora,
    text_encoder_configs,
    text_encoders_of,
)


def merge_loras(first: Path, second: Path, out: Path, weights: tuple[float, float] = (1.0, 1.0)) -> Path:
    import torch
    from peft import LoraConfig

    (tensors_a, config_a, info_a), (tensors_b, config_b, info_b) = read_lora(first), read_lora(second)
    base_a, base_b = info_a.get("base_model"), info_b.get("base_model")
    if base_a and base_b and base_a != base_b:
        raise LookalikeError(f"cannot merge LoRAs of different base models: {first} is for {base_a}, "
                             f"{second} for {base_b}")
    if denoiser_of(tensors_a) != denoiser_of(tensors_b):
        raise LookalikeError(f"cannot merge a LoRA of a {denoiser_of(tensors_a)} ({first}) with one of a "
                             f"{denoiser_of(tensors_b)} ({second})")
    denoiser = denoiser_of(tensors_a)
    rank_a, rank_b = config_a["r"], config_b["r"]
    scale_a = weights[0] * config_a["lora_alpha"] / rank_a
    scale_b = weights[1] * config_b["lora_alpha"] / rank_b
    # The denoiser's modules, then the text encoders' where either LoRA trained them (train_text_encoder).
    components = [denoiser] + [encoder for encoder in TEXT_ENCODERS
                               if encoder in text_encoders_of(tensors_a) + text_encoders_of(tensors_b)]
    merged = {}
    for component in components:
        modules_a, modules_b = modules_of(tensors_a, component), modules_of(tensors_b, component)
        for name in sorted(modules_a.keys() | modules_b.keys()):
            shapes = {}
            for label, modules in (("first", modules_a), ("second", modules_b)):
                if name in modules:
                    down, up = modules[name]
                    shapes[label] = (down.shape[1], up.shape[0])
            if len(set(shapes.values())) > 1:
                raise LookalikeError(f"cannot merge: module {name} is {shapes['first'][0]} -> {shapes['first'][1]} "
                                     f"in {first} but {shapes['second'][0]} -> {shapes['second'][1]} in {second}")
            (features_in, features_out), = set(shapes.values())
            parts = []
            for modules, rank, scale in ((modules_a, rank_a, scale_a), (modules_b, rank_b, scale_b)):
                if name in modules:
                    down, up = (t.float() for t in modules[name])
                    parts.append((down, up * scale))
                else:
                    parts.append((torch.zeros(rank, features_in), torch.zeros(features_out, rank)))
            merged[f"{component}.{name}.lora_A.weight"] = torch.cat([down for down, _ in parts]).contiguous()
            merged[f"{component}.{name}.lora_B.weight"] = torch.cat([up for _, up in parts], dim=1).contiguous()

    rank = rank_a + rank_b
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=sorted(modules_of(merged, denoiser)))
    info = {"base_model": base_a or base_b or "unknown", "rank": rank, "alpha": rank,
            "merged_from": f"{Path(first).name} x {weights[0]:g} + {Path(second).name} x {weights[1]:g}",
            "trigger_word": " ".join(dict.fromkeys(word for t in (info_a.get("trigger_word"),
                                                                  info_b.get("trigger_word")) if t
                                                   for word in t.split()))}  # each token once, in order
    save_lora(out, merged, config, info, text_encoder_configs=text_encoder_configs(merged, rank, rank))
    return out
