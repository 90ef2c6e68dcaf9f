"""Training objectives: how a batch of clean latents is noised, and what the denoiser learns to predict. A family
names its objective (Family.objective_kind); the trainer draws every random number through it from the run's one
generator, so a resumed run draws exactly what an uninterrupted one would.

- FlowMatching (FLUX.1, FLUX.2, Z-Image, Qwen-Image and 2.1, Krea 2, SD3): x_t = (1 - sigma) x0 + sigma noise,
  target noise - x0 (train/flow_matching.py); train.timestep_sampling, logit_mean, logit_std and timestep_shift
  choose sigma.
  Preconditioned (SD3, as its reference script's default --precondition_outputs): the loss compares the clean
  latents the predicted velocity implies, x_t - sigma v, with x0, which weights each example's velocity error by
  sigma squared.
- NoisePrediction (Stable Diffusion 1.x and XL): DDPM's x_t = sqrt(a_t) x0 + sqrt(1 - a_t) noise at a uniform
  integer timestep, target the noise (epsilon) or v = sqrt(a_t) noise - sqrt(1 - a_t) x0, as the base's scheduler
  config says; train.noise_offset and train.snr_gamma (min-SNR weighting) as diffusers' reference scripts apply
  them.
"""

from __future__ import annotations

from pathlib import Path

import torch

from lookalike.errors import LookalikeError
from lookalike.train.flow_matching import noisy_latents, sample_sigmas, velocity_target


class FlowMatching:
    def __init__(self, preconditioned: bool = False):
        self.preconditioned = preconditioned

    def draw(self, shape: torch.Size, generator: torch.Generator, t) -> tuple[torch.Tensor, torch.Tensor]:
        """(noise, sigmas) for a batch of latents of `shape` (the order of the draws is part of resuming)."""
        noise = torch.randn(shape, generator=generator)
        sigmas = sample_sigmas(shape[0], t.timestep_sampling, generator, t.logit_mean, t.logit_std, t.timestep_shift,
                               t.mode_scale)
        return noise, sigmas

    def noisy(self, x0: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
        return noisy_latents(x0, noise, sigmas)

    def compared(self, prediction: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor,
                 sigmas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(what the loss compares, with what): the predicted velocity with noise - x0, or, preconditioned, the
        clean latents it implies with x0."""
        if not self.preconditioned:
            return prediction, velocity_target(x0, noise).to(prediction.device)
        x0, noise = x0.to(prediction.device), noise.to(prediction.device)
        implied = noisy_latents(x0, noise, sigmas.to(prediction.device)) - _per_example(sigmas, x0) * prediction
        return implied, x0

    def loss(self, prediction: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor, t,
             weights: torch.Tensor | None = None):
        prediction, target = self.compared(prediction, x0, noise, sigmas)
        if weights is None and t.loss_weighting == "none":
            return torch.nn.functional.mse_loss(prediction.float(), target.float())
        per_example = squared_errors(prediction, target, weights)
        if t.loss_weighting == "none":
            return per_example.mean()
        from diffusers.training_utils import compute_loss_weighting_for_sd3

        # The SD3 paper's weightings of each example's loss by its noise level, as diffusers' reference scripts
        # apply them (--weighting_scheme sigma_sqrt or cosmap).
        weighting = compute_loss_weighting_for_sd3(t.loss_weighting, sigmas.float()).to(prediction.device)
        return (per_example * weighting).mean()


class NoisePrediction:
    """DDPM training with the base's own noise schedule (its scheduler config, read as DDPMScheduler reads it)."""

    def __init__(self, folder: Path):
        from diffusers import DDPMScheduler

        self.scheduler = DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
        self.prediction_type = self.scheduler.config.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise LookalikeError(f"{folder}/scheduler: prediction_type {self.prediction_type!r} is not trained "
                                 "(epsilon or v_prediction)")

    def draw(self, shape: torch.Size, generator: torch.Generator, t) -> tuple[torch.Tensor, torch.Tensor]:
        """(noise, timesteps): Gaussian noise, plus train.noise_offset times noise constant over each channel
        (the reference scripts' offset noise: darker darks and brighter lights), and uniform integer timesteps."""
        noise = torch.randn(shape, generator=generator)
        if t.noise_offset:
            noise = noise + t.noise_offset * torch.randn((shape[0], shape[1], 1, 1), generator=generator)
        timesteps = torch.randint(0, self.scheduler.config.num_train_timesteps, (shape[0],), generator=generator)
        return noise, timesteps

    def noisy(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return self.scheduler.add_noise(x0, noise, timesteps)

    def compared(self, prediction: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor,
                 timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the prediction, its target): the noise, or v."""
        target = noise if self.prediction_type == "epsilon" else self.scheduler.get_velocity(x0, noise, timesteps)
        return prediction, target.to(prediction.device)

    def loss(self, prediction: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, t,
             weights: torch.Tensor | None = None):
        prediction, target = self.compared(prediction, x0, noise, timesteps)
        if t.snr_gamma is None and weights is None:
            return torch.nn.functional.mse_loss(prediction.float(), target.float())
        per_example = squared_errors(prediction, target, weights)
        if t.snr_gamma is None:
            return per_example.mean()
        from diffusers.training_utils import compute_snr

        # Min-SNR weighting (Hang et al. 2023): each example's loss times min(SNR, gamma) / SNR for epsilon, over
        # SNR + 1 for v-prediction, so that the easy low-noise timesteps stop dominating.
        snr = compute_snr(self.scheduler, timesteps)
        snr_weights = torch.clamp(snr, max=t.snr_gamma) / (snr if self.prediction_type == "epsilon" else snr + 1)
        return (per_example * snr_weights.to(prediction.device)).mean()


def family_objective(family, folder: Path):
    """The objective a family's base trains with (Family.objective_kind), for the base in `folder`."""
    if family.objective_kind == "noise_prediction":
        return NoisePrediction(folder)
    return FlowMatching(preconditioned=family.objective_kind == "preconditioned_flow_matching")


def _per_example(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """One value per example, shaped to broadcast over a batch laid out as `like`."""
    return values.view(-1, *([1] * (like.dim() - 1))).to(like.device, like.dtype)


def squared_errors(prediction: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """Each example's mean squared error; with `weights` (laid out as the prediction), its weighted mean
    sum(w e²) / sum(w) (train/face_weights.py)."""
    errors = (prediction.float() - target.float()) ** 2
    dims = tuple(range(1, errors.dim()))
    if weights is None:
        return errors.mean(dim=dims)
    weights = weights.to(errors.device, errors.dtype)
    return (errors * weights).sum(dim=dims) / weights.sum(dim=dims)


def with_prior(objective, prediction: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, levels: torch.Tensor, t,
               subject_rows: int, weight: float, weights: torch.Tensor | None = None) -> torch.Tensor:
    """DreamBooth's loss with prior preservation, as diffusers' reference scripts compute it: the batch's first
    `subject_rows` rows are the subject's, trained by the objective's own loss (with their `weights`); the rest
    are class examples, whose plain mean squared error against the objective's target is added times `weight`."""
    own = objective.loss(prediction[:subject_rows], x0[:subject_rows], noise[:subject_rows], levels[:subject_rows], t,
                         None if weights is None else weights[:subject_rows])
    compared, target = objective.compared(prediction[subject_rows:], x0[subject_rows:], noise[subject_rows:],
                                          levels[subject_rows:])
    prior = torch.nn.functional.mse_loss(compared.float(), target.float())
    return own + weight * prior
