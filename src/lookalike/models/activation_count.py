"""Activation values counted rather than tabulated, for denoisers whose blocks run at several resolutions and
widths (the Stable Diffusion UNets): the run's architecture is built on the meta device (no memory, no weights)
and called once through its family's `predict` at the run's resolution, and what autograd saves for the backward
pass is counted, each storage once, the parameters left out, block by block.

Attention is counted as a GPU's memory-efficient kernel keeps it (its inputs, output and log-sum-exp per query):
on the meta device PyTorch would take its math path, which keeps every attention map, quadratic in the tokens.
Gradient checkpointing then keeps, of each checkpointed block, only its input, and recomputes one block at a time
during the backward pass. The backward pass frees each block's saved values as it goes, which covers its own
working values: measured on the tiny UNets at 1024 px, the peak is the count within 10% either way
(tests/test_memory.py).
"""

from __future__ import annotations

import contextlib
import functools
import json
from unittest import mock

import torch


class _MemoryEfficientAttention(torch.autograd.Function):
    """What a memory-efficient attention kernel saves: query, key, value, output and a log-sum-exp per query."""

    @staticmethod
    def forward(ctx, query, key, value):
        output = torch.empty(*query.shape[:-1], value.shape[-1], dtype=query.dtype, device=query.device)
        ctx.save_for_backward(query, key, value, output,
                              torch.empty(query.shape[:-1], dtype=torch.float32, device=query.device))
        return output

    @staticmethod
    def backward(ctx, grad):  # never run: the count needs the forward pass only
        raise NotImplementedError


def _attention(query, key, value, *args, **kwargs):
    return _MemoryEfficientAttention.apply(query, key, value)


@functools.lru_cache(maxsize=32)
def _counted(family_name: str, architecture_json: str, resolution: int, text_tokens: int
             ) -> tuple[int, tuple[tuple[int, int], ...]]:
    """(values saved by one example's forward pass, (values saved inside, input values) of each checkpointable
    block in call order)."""
    from lookalike.models.families import FAMILIES
    from lookalike.models.lora import add_lora

    family = FAMILIES[family_name]
    architecture = json.loads(architecture_json)
    with torch.device("meta"):
        model = family.component_class(family.denoiser).from_config(architecture)
    add_lora(model, 16, 16.0, "attention")
    parameters = {p.untyped_storage()._cdata for p in model.parameters()}
    saved: dict[int, int] = {}

    def keep(tensor):
        storage = tensor.untyped_storage()
        if storage._cdata not in parameters:
            saved[storage._cdata] = storage.nbytes() // tensor.element_size()
        return tensor

    blocks: list[list[int]] = []
    kinds = family.checkpointed_block_types(model)
    hooks = []
    for module in model.modules():
        if type(module).__name__ in kinds:
            hooks.append(module.register_forward_pre_hook(
                lambda _, args: blocks.append([sum(saved.values()), args[0].numel()])))
            hooks.append(module.register_forward_hook(
                lambda *_: blocks[-1].__setitem__(0, sum(saved.values()) - blocks[-1][0])))
    side = resolution // family.vae_factor
    with torch.device("meta"), contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(torch.nn.functional, "scaled_dot_product_attention", _attention))
        stack.enter_context(torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor))
        latents = torch.zeros(1, family.latent_channels(architecture), side, side)
        noisy, layout = family.model_input(latents, (0.0, 1.0))
        text = {name: torch.zeros(shape) for name, shape in family.text_shapes(architecture, text_tokens).items()}
        family.predict(model, model.config, noisy, torch.tensor([500]), [text], 1.0, layout, "meta", torch.float32)
    for hook in hooks:
        hook.remove()
    return sum(saved.values()), tuple((inside, given) for inside, given in blocks)


def counted_activations(family, architecture: dict, resolution: int, text_tokens: int, checkpointing: bool,
                        every: int) -> float:
    """Activation values one example keeps at the peak of a training step."""
    total, blocks = _counted(family.name, json.dumps(architecture, sort_keys=True), resolution, text_tokens)
    chosen = [blocks[index] for index in range(0, len(blocks), every)] if checkpointing else []
    kept = total - sum(inside for inside, _ in chosen) + sum(given for _, given in chosen)
    recomputed = max((inside for inside, _ in chosen), default=0)
    return float(kept + recomputed)
