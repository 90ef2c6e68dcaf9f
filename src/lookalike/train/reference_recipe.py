"""The training recipe a [train] key left unset takes: the base's diffusers reference script's
(train_dreambooth_lora_<family>.py), as its family declares it. A key the user sets wins."""

from __future__ import annotations

from pathlib import Path

from lookalike.config import TrainConfig


def with_reference_recipe(t: TrainConfig, family, folder: Path) -> TrainConfig:
    """[train] with timestep_sampling, timestep_shift and vae_posterior filled in where unset: the script's noise
    level sampling on its base scheduler's shift, and its use of the VAE posterior."""
    return t.model_copy(update={
        "timestep_sampling": t.timestep_sampling or family.reference_sampling,
        "timestep_shift": t.timestep_shift or family.grid_shift(folder),
        "vae_posterior": t.vae_posterior or family.reference_posterior})


def recipe_line(t: TrainConfig) -> str:
    """How the run's noise levels and latents are drawn, in one line (the progress shows it at the start)."""
    shift = f", shifted by {t.timestep_shift:g}" if t.timestep_shift != 1 else ""
    return f"noise levels {t.timestep_sampling.replace('_', '-')}{shift}; VAE posterior's {t.vae_posterior}"
