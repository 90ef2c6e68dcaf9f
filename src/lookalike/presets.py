"""Named starting points for a base's main [train] keys: what the studio's Train page offers and what `lookalike
init` writes (its "balanced" one). Every other key keeps its default, the base's reference recipe among them."""

from __future__ import annotations

from typing import Any

from lookalike.models.families import FAMILIES, KNOWN_BASES

# The same three for every base: more steps and rank trade time for likeness. Each base trains at its own size.
GENERAL = {
    "quick": {"train.max_train_steps": 500, "train.rank": 8, "train.learning_rate": 1e-3},
    "balanced": {"train.max_train_steps": 1000, "train.rank": 16, "train.learning_rate": 5e-4},
    "best likeness": {"train.max_train_steps": 2000, "train.rank": 32, "train.learning_rate": 3e-4,
                      "train.background_loss_weight": 0.1},
}
# The training guidance the reference scripts feed a guidance-distilled transformer (their --guidance_scale);
# lookalike trains at 1.0 by default (docs/bases.md).
SCRIPT_TRAINING_GUIDANCE = 3.5


def presets(base: str) -> dict[str, dict[str, Any]]:
    """The presets of `base`, by name: the general three, and "reference script": the layers, schedule and
    training guidance of the base's diffusers reference script, which lookalike's defaults differ from by choice."""
    script: dict[str, Any] = {"train.target_modules": "diffusers", "train.lr_scheduler": "constant"}
    info = KNOWN_BASES.get(base)
    if info is not None and FAMILIES[info.family].distilled_guidance and info.guidance:
        script["train.guidance"] = SCRIPT_TRAINING_GUIDANCE
    return {**GENERAL, "reference script": script}

