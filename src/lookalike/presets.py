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
# Families whose transformer takes a distilled guidance scale while training (FLUX.1-dev, FLUX.2 [dev]): their
# scripts feed it 3.5 (--guidance_scale), lookalike 1.0 by default (docs/bases.md).
DISTILLED_GUIDANCE_FAMILIES = ("flux1", "flux2-dev")


def presets(base: str) -> dict[str, dict[str, Any]]:
    """The presets of `base`, by name: the general three, and "reference script": the layers, schedule and
    training guidance of the base's diffusers reference script, which lookalike's defaults differ from by choice."""
    script: dict[str, Any] = {"train.target_modules": "diffusers", "train.lr_scheduler": "constant"}
    info = KNOWN_BASES.get(base)
    if info is not None and info.family in DISTILLED_GUIDANCE_FAMILIES and info.guidance:
        script["train.guidance"] = 3.5
    return {**GENERAL, "reference script": script}


def family_title(base: str) -> str:
    """The base's family as people write it, or "" for a name the registry does not know."""
    info = KNOWN_BASES.get(base)
    return FAMILIES[info.family].title if info is not None else ""
