"""The bare LoRA training step that the benchmarks compare against: the transformer with a LoRA, AdamW, and
one fixed batch of random FLUX inputs (latents, cached text embeddings, position ids), nothing else."""

from __future__ import annotations

import time

import torch

from lookalike.models.lora import add_lora
from lookalike.train.attention import training_attention


def add_trainable_lora(transformer, rank: int, adapter: str = "lora", lokr_factor: int = -1
                       ) -> tuple[list[torch.nn.Parameter], torch.optim.Optimizer]:
    """A LoRA (or the `adapter` train.adapter names) in fp32 with its AdamW, as the trainer keeps them."""
    torch.manual_seed(0)
    add_lora(transformer, rank, rank, "attention", adapter=adapter, lokr_factor=lokr_factor)
    params = [p for p in transformer.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    return params, torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-4)


def random_batch(config, resolution: int, text_tokens: int, device, dtype) -> tuple[dict, torch.Tensor]:
    """Transformer inputs for one image of `resolution` pixels (8x VAE, then 2x2 packing), and a target."""
    from diffusers import FluxPipeline

    side = resolution // 16
    latents = torch.randn(1, side * side, config.in_channels, device=device, dtype=dtype)
    inputs = dict(
        hidden_states=latents,
        timestep=torch.tensor([0.5], device=device, dtype=dtype),
        guidance=torch.tensor([1.0], device=device),
        pooled_projections=torch.randn(1, config.pooled_projection_dim, device=device, dtype=dtype),
        encoder_hidden_states=torch.randn(1, text_tokens, config.joint_attention_dim, device=device, dtype=dtype),
        txt_ids=torch.zeros(text_tokens, 3, device=device),
        img_ids=FluxPipeline._prepare_latent_image_ids(1, side, side, device, dtype),
        return_dict=False,
    )
    return inputs, torch.randn_like(latents)


def family_batch(family, transformer, resolution: int, text_tokens: int, device, dtype):
    """One random example of `resolution` pixels for any family, called through the family as the trainer calls
    it: a forward function and its target."""
    config = transformer.config
    latents = torch.randn(1, family.latent_channels(config), resolution // family.vae_factor,
                          resolution // family.vae_factor)
    noisy, layout = family.model_input(latents, (0.0, 1.0))  # normalised as (x - 0) * 1: values do not matter
    text = {name: torch.randn(shape, device=device, dtype=dtype)
            for name, shape in family.text_shapes(config, text_tokens).items()}
    sigmas = torch.tensor([0.5])

    def forward():
        return family.predict(transformer, config, noisy, sigmas, [text], 1.0, layout, device, dtype)

    return forward, torch.randn(noisy.shape, device=device, dtype=dtype)


def timed_steps(forward, params, optimizer, target, steps: int, autocast_dtype=None) -> list[float]:
    """Seconds of each of `steps` forward + backward + clip + AdamW steps (GPU work waited for), on the attention
    kernels the trainer uses; `forward()` returns the transformer's prediction."""
    with training_attention():
        return [_timed_step(forward, params, optimizer, target, autocast_dtype) for _ in range(steps)]


def _timed_step(forward, params, optimizer, target, autocast_dtype) -> float:
    started = time.perf_counter()
    with torch.autocast(target.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        prediction = forward()
    loss = torch.nn.functional.mse_loss(prediction.float(), target.float())
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if target.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started
