"""Activation figures of each family's transformer blocks: the values a block keeps for the backward pass, per
token and hidden unit, which `train --dry-run` multiplies out for a run's resolution and text length.

Each family's published architecture is built at its real head size but 8 heads (hidden 1024: its ratios of
MLP to attention and of head to hidden intact, small enough for a CPU) with a rank-16 attention LoRA, and called
through the family's own `predict`, as the trainer calls it, on 256 image and 64 text tokens. What autograd
saves during the forward pass is counted (each storage once, the parameters left out); one more block of a kind
adds that block's figure. Deterministic: counts, not timings, so any quiet or busy CPU gives the same figures.

    python bench/activation_figures.py              # every family
    python bench/activation_figures.py flux1        # one

Compare the printed figures with `activation_figures` in src/lookalike/models/families/<family>.py.
Last line: max_relative_difference=<largest |printed - stored| / stored over the families measured>.
"""

from __future__ import annotations

import sys

import torch

from lookalike.models.base import quiet_libraries
from lookalike.models.families import FAMILIES, KNOWN_BASES
from lookalike.models.lora import add_lora

IMAGE_SIDE = 16  # tokens per side: 256 image tokens (256 px)
TEXT_TOKENS = 64
HEADS = 8

# Per family: a hub base whose published architecture is measured, the config keys of its heads (narrowed to
# HEADS) and hidden size where it names one, the config keys that count its blocks (set to one block each), and
# for each kind of block the config changes that add one more block of that kind.
FAMILY_SETUPS = {
    "flux1": dict(base="flux-dev", heads=("num_attention_heads",), counts=("num_layers", "num_single_layers"),
                  kinds={"double": {"num_layers": 2}, "single": {"num_single_layers": 2}}),
    "flux2": dict(base="flux2-klein-4b", heads=("num_attention_heads",), counts=("num_layers", "num_single_layers"),
                  kinds={"double": {"num_layers": 2}, "single": {"num_single_layers": 2}}),
    "z-image": dict(base="z-image", heads=("n_heads", "n_kv_heads"), hidden="dim", counts=("n_layers",
                                                                                            "n_refiner_layers"),
                    kinds={"layer": {"n_layers": 2}, "refiner": {"n_refiner_layers": 2}}),
    "qwen-image": dict(base="qwen-image", heads=("num_attention_heads",), counts=("num_layers",),
                       kinds={"block": {"num_layers": 2}}),
    "qwen-image21": dict(base="qwen-image-2.1", heads=("num_attention_heads",), counts=("num_layers",),
                         kinds={"block": {"num_layers": 2}}),
    # Krea 2's blocks, at 12 heads (its 4:1 grouped-query attention and its feed-forward's 8/3 of the hidden size
    # kept whole). Its text-fusion blocks run before any layer the LoRA adapts, so they keep nothing.
    "krea2": dict(base="krea2-raw", heads=(), counts=("num_layers", "num_layerwise_text_blocks",
                                                      "num_refiner_text_blocks"),
                  fixed={"num_attention_heads": 12, "num_key_value_heads": 3, "intermediate_size": 4096},
                  kinds={"block": {"num_layers": 2}}),
    # SD3.5 Medium's blocks: a joint block, and one with its second self-attention over the image (MMDiT-X).
    "sd3": dict(base="sd3.5-medium", heads=("num_attention_heads",), hidden="caption_projection_dim",
                counts=("num_layers",),
                fixed={"dual_attention_layers": ()},
                kinds={"joint": {"num_layers": 2}, "dual": {"num_layers": 2, "dual_attention_layers": (1,)}}),
}


def narrowed(setup: dict) -> dict:
    """The published architecture with HEADS heads of its real size and one block of each kind."""
    architecture = dict(KNOWN_BASES[setup["base"]].architecture)
    head = architecture["attention_head_dim"] if "hidden" not in setup else \
        architecture[setup["hidden"]] // architecture[setup["heads"][0]]
    architecture.update({key: HEADS for key in setup["heads"]})
    if "hidden" in setup:
        architecture[setup["hidden"]] = HEADS * head
    architecture.update({key: 1 for key in setup["counts"]}, **setup.get("fixed", {}))
    return architecture


def saved_values(family, architecture: dict) -> int:
    """Values autograd keeps from one forward pass of the transformer (LoRA on its attention), parameters
    excluded."""
    torch.manual_seed(0)
    transformer = family.component_class("transformer").from_config(architecture)
    add_lora(transformer, 16, 16.0, "attention")
    parameters = {p.untyped_storage().data_ptr() for p in transformer.parameters()}
    side = IMAGE_SIDE * family.latent_patch
    latents = torch.randn(1, family.latent_channels(architecture), side, side)
    noisy, layout = family.model_input(latents, (0.0, 1.0))  # normalised as (x - 0) * 1: values do not matter
    text = {name: torch.randn(shape) for name, shape in family.text_shapes(architecture, TEXT_TOKENS).items()}
    saved: dict[int, int] = {}

    def keep(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        family.predict(transformer, transformer.config, noisy, torch.tensor([0.5]), [text], 1.0, layout, "cpu",
                       torch.float32)
    return sum(saved.values()) // 4


def figures(name: str) -> dict[str, float]:
    """Each kind of block's values per token and hidden unit, from one more block of that kind. (Z-Image's
    refiners come in pairs: one over the image tokens, one over the text's.)"""
    family, setup = FAMILIES[name], FAMILY_SETUPS[name]
    architecture = narrowed(setup)
    hidden = family.hidden_size(architecture)
    tokens = IMAGE_SIDE * IMAGE_SIDE + TEXT_TOKENS
    one = saved_values(family, architecture)
    measured = {}
    for kind, changes in setup["kinds"].items():
        two = saved_values(family, dict(architecture, **changes))
        measured[kind] = (two - one) / (tokens * hidden)
    return measured


def main() -> None:
    quiet_libraries()
    worst = 0.0
    for name in sys.argv[1:] or list(FAMILY_SETUPS):
        stored = FAMILIES[name].activation_figures
        for kind, value in figures(name).items():
            difference = abs(value - stored[kind]) / stored[kind]
            worst = max(worst, difference)
            print(f"{name:11s} {kind:8s} measured {value:6.2f}  stored {stored[kind]:6.2f}  ({difference:.1%})")
    print(f"max_relative_difference={worst:.3f}")


if __name__ == "__main__":
    main()
