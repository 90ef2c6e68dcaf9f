"""train --dry-run: memory estimated before anything is loaded; parameter counts checked against real models."""

from __future__ import annotations

import pytest

from lookalike.config import load_config
from lookalike.train.memory import count_parameters, estimate, out_of_memory_message, transformer_config
from tests.conftest import run_cli


def test_parameter_counts_are_those_of_the_real_tiny_transformer_with_its_lora(tiny_config):
    from diffusers import FluxTransformer2DModel

    from lookalike.models.lora import add_lora
    from lookalike.models.tiny import ensure_tiny_model

    config = load_config(tiny_config(train={"rank": 8, "target_modules": "attention+mlp"}))
    frozen, lora = count_parameters(transformer_config(config), 8, 8.0, "attention+mlp")
    real = FluxTransformer2DModel.from_pretrained(ensure_tiny_model(), subfolder="transformer")
    add_lora(real, 8, 8.0, "attention+mlp")
    assert lora == sum(p.numel() for p in real.parameters() if p.requires_grad)
    assert frozen == sum(p.numel() for p in real.parameters() if not p.requires_grad)


def test_flux_dev_is_counted_without_any_download(tiny_config):
    config = load_config(tiny_config(model={"base": "flux-dev"}, data={"resolution": 1024}))
    bf16 = estimate(config, "bf16")
    assert 11.8e9 < bf16.parameters < 12.0e9, "FLUX.1-dev's transformer has 11.9 B parameters"
    assert bf16.weights == pytest.approx(estimate(config, "no").weights / 2)
    lighter = config.model_copy(update={"train": config.train.model_copy(update={"gradient_checkpointing": True})})
    half = config.model_copy(update={"train": config.train.model_copy(
        update={"gradient_checkpointing": True, "gradient_checkpointing_every": 2})})
    assert estimate(lighter, "bf16").activations < estimate(half, "bf16").activations < bf16.activations
    message = out_of_memory_message(config, "bf16")
    assert f"estimated to need ~{bf16.total:.1f} GB at 1024 px" in message
    assert "train.gradient_checkpointing=true" in message


def test_dry_run_prints_the_estimate_and_loads_or_writes_nothing(tiny_config, tmp_path):
    result = run_cli("train", str(tiny_config()), "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "transformer weights" in result.stdout and "total" in result.stdout
    assert not (tmp_path / "work" / "runs").exists() and not (tmp_path / "work" / "data").exists()
