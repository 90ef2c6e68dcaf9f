"""Rectified-flow training targets of the flow-matching families (FLUX.1, FLUX.2, Z-Image, Qwen-Image), as pure
functions of tensors and a random generator.

A clean latent x0 and noise e are mixed as x_t = (1 - sigma) x0 + sigma e; the transformer predicts the
velocity e - x0 (each family's `predict` feeds it the noise level as that transformer expects it).
"""

from __future__ import annotations

import torch


# The noise levels a flow-matching scheduler trains with (FlowMatchEulerDiscreteScheduler's num_train_timesteps):
# every family's base has 1,000.
TRAIN_TIMESTEPS = 1000


def sample_sigmas(
    batch: int, sampling: str, generator: torch.Generator, logit_mean: float = 0.0, logit_std: float = 1.0,
    shift: float = 1.0, mode_scale: float = 1.29,
) -> torch.Tensor:
    """Noise levels in (0, 1], one per example, drawn as diffusers' reference scripts draw them: u from
    diffusers' own density (uniform, logit-normal, or the SD3 paper's mode sampling with mode_scale), then the
    level at index u x 1000 of the scheduler's 1,000 levels (noisiest first), shifted by `shift`."""
    from diffusers.training_utils import compute_density_for_timestep_sampling

    u = compute_density_for_timestep_sampling("none" if sampling == "uniform" else sampling, batch, logit_mean,
                                              logit_std, mode_scale, generator=generator)
    # A logit-normal u rounds to 1.0 in float32 beyond about 17 standard deviations: the last level, not an error.
    index = (u * TRAIN_TIMESTEPS).long().clamp(max=TRAIN_TIMESTEPS - 1)
    return noise_levels(shift)[index]


def noise_levels(shift: float) -> torch.Tensor:
    """The scheduler's training noise levels, as FlowMatchEulerDiscreteScheduler makes them: 1000/1000 down to
    1/1000, shifted."""
    levels = torch.arange(TRAIN_TIMESTEPS, 0, -1, dtype=torch.float32) / TRAIN_TIMESTEPS
    return shift_sigmas(levels, shift)


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """Noise levels moved towards noise (shift > 1), as the flow-matching schedulers shift their own."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def noisy_latents(latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    sigmas = sigmas.view(-1, *([1] * (latents.dim() - 1))).to(latents.dtype)
    return (1 - sigmas) * latents + sigmas * noise


def velocity_target(latents: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    return noise - latents
