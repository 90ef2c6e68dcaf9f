"""Rectified-flow training targets of the flow-matching families (FLUX.1, FLUX.2, Z-Image, Qwen-Image), as pure
functions of tensors and a random generator.

A clean latent x0 and noise e are mixed as x_t = (1 - sigma) x0 + sigma e; the transformer predicts the
velocity e - x0 (each family's `predict` feeds it the noise level as that transformer expects it).
"""

from __future__ import annotations

import torch


def sample_sigmas(
    batch: int, sampling: str, generator: torch.Generator, logit_mean: float = 0.0, logit_std: float = 1.0,
    shift: float = 1.0, mode_scale: float = 1.29,
) -> torch.Tensor:
    """Noise levels in (0, 1), one per example: uniform, logit-normal, or the SD3 paper's mode sampling (diffusers'
    own, with its mode_scale: heavier in the middle); then shifted towards noise if shift > 1."""
    if sampling == "uniform":
        sigmas = torch.rand(batch, generator=generator)
    elif sampling == "logit_normal":
        sigmas = torch.sigmoid(logit_mean + logit_std * torch.randn(batch, generator=generator))
    elif sampling == "mode":
        from diffusers.training_utils import compute_density_for_timestep_sampling

        sigmas = compute_density_for_timestep_sampling("mode", batch, mode_scale=mode_scale, generator=generator)
    else:
        raise ValueError(f"unknown timestep sampling {sampling!r}")
    return shift_sigmas(sigmas, shift)


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """Noise levels moved towards noise (shift > 1), as the flow-matching schedulers shift their own."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def noisy_latents(latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    sigmas = sigmas.view(-1, *([1] * (latents.dim() - 1))).to(latents.dtype)
    return (1 - sigmas) * latents + sigmas * noise


def velocity_target(latents: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    return noise - latents
