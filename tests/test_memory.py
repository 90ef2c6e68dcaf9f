"""train --dry-run: memory estimated before anything is loaded; parameter counts checked against real models,
the whole estimate against the memory a real training step of the tiny model takes on the CPU."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from lookalike.config import load_config
from lookalike.models.base import base_info
from lookalike.models.families import base_family
from lookalike.train.memory import count_parameters, estimate, out_of_memory_message, transformer_config
from tests.conftest import run_cli
from tests.helpers import MEASURING, PEAK_OF_A_STEP


def test_parameter_counts_are_those_of_the_real_tiny_transformer_with_its_lora(tiny_config):
    from diffusers import FluxTransformer2DModel

    from lookalike.models.families.flux1 import ensure_tiny_model
    from lookalike.models.lora import add_lora

    config = load_config(tiny_config(train={"rank": 8, "target_modules": "attention+mlp"}))
    counts = count_parameters(transformer_config(config), 8, 8.0, "attention+mlp")
    real = FluxTransformer2DModel.from_pretrained(ensure_tiny_model(), subfolder="transformer")
    add_lora(real, 8, 8.0, "attention+mlp")
    assert counts.lora == sum(p.numel() for p in real.parameters() if p.requires_grad)
    assert counts.frozen == sum(p.numel() for p in real.parameters() if not p.requires_grad)
    linear = [m for m in real.modules() if type(m) is torch.nn.Linear and not m.weight.requires_grad]
    assert counts.linear == sum(m.weight.numel() for m in linear) < counts.frozen


def test_flux_dev_is_counted_without_any_download(tiny_config):
    config = load_config(tiny_config(model={"base": "flux-dev"}, data={"resolution": 1024}))
    bf16 = estimate(config, "bf16")
    assert 11.8e9 < bf16.counts.frozen < 12.0e9, "FLUX.1-dev's transformer has 11.9 B parameters"
    assert bf16.weights == pytest.approx(estimate(config, "no").weights / 2)
    lighter = config.model_copy(update={"train": config.train.model_copy(update={"gradient_checkpointing": True})})
    half = config.model_copy(update={"train": config.train.model_copy(
        update={"gradient_checkpointing": True, "gradient_checkpointing_every": 2})})
    assert estimate(lighter, "bf16").activations < estimate(half, "bf16").activations < bf16.activations
    message = out_of_memory_message(config, "bf16")
    assert f"estimated to need ~{bf16.total:.1f} GB at 1024 px" in message
    assert "train.gradient_checkpointing=true" in message


@pytest.mark.slow
def test_dry_run_prints_the_estimate_and_loads_or_writes_nothing(tiny_config, tmp_path):
    result = run_cli("train", str(tiny_config()), "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "transformer weights" in result.stdout and "total" in result.stdout
    assert not (tmp_path / "work" / "runs").exists() and not (tmp_path / "work" / "data").exists()


# One training step of each tiny transformer asked for (base, checkpointing), with its LoRA and AdamW, called
# through its family as the trainer calls it, in one fresh process; each model is freed before the next.
MEASURE_STEPS = PEAK_OF_A_STEP + """
import ctypes, gc, json, sys, torch
from lookalike.models.base import load_component, resolve_base
from lookalike.models.families import base_family
from lookalike.models.lora import add_lora
text_tokens = int(sys.argv[1])
def measure(base, checkpointing, resolution):
    family = base_family(base)
    transformer = load_component(resolve_base(base), family.denoiser, torch.float32)
    add_lora(transformer, 4, 4.0, "attention")
    params = [p for p in transformer.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    if checkpointing:
        transformer.enable_gradient_checkpointing()
    config = transformer.config
    latents = torch.randn(1, family.latent_channels(config), resolution // family.vae_factor,
                          resolution // family.vae_factor)
    noisy, layout = family.model_input(latents, (0.0, 1.0))
    text = {name: torch.randn(shape) for name, shape in family.text_shapes(config, text_tokens).items()}
    def step():
        prediction = family.predict(transformer, config, noisy, torch.tensor([0.5]), [text], 1.0, layout, "cpu",
                                    torch.float32)
        torch.nn.functional.mse_loss(prediction, noisy).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    peak = peak_of(step)
    held = sum(p.nbytes for p in transformer.parameters()) + sum(
        v.nbytes for state in optimizer.state.values() for v in state.values() if v.dim())
    return {"held": held, "step": peak}
for base, checkpointing, resolution in json.loads(sys.argv[2]):
    print(json.dumps({"base": base, "checkpointing": checkpointing, **measure(base, checkpointing, resolution)}),
          flush=True)
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
"""
# (base, gradient checkpointing, resolution): the transformers at 4,096 image tokens, where the tiny models'
# activations outweigh the noise; the tiny UNets, whose activations are per pixel and larger, at 512 px.
MEASURED = [("tiny", False, 1024), ("tiny", True, 1024), ("tiny-flux2-klein", False, 1024),
            ("tiny-z-image", False, 1024), ("tiny-z-image", True, 1024), ("tiny-qwen-image", False, 1024),
            ("tiny-qwen-image21", False, 1024), ("tiny-krea2", False, 1024), ("tiny-krea2", True, 1024),
            ("tiny-sd3", False, 1024), ("tiny-sd3", True, 1024), ("tiny-sd15", False, 512), ("tiny-sd15", True, 512),
            ("tiny-sdxl", False, 512), ("tiny-sdxl", True, 512)]


@pytest.mark.slow
def test_estimate_is_within_20_percent_of_a_measured_training_step(tiny_config):
    """Every family, with and without gradient checkpointing where it has blocks to checkpoint."""
    text_tokens = 32
    result = subprocess.run([sys.executable, "-c", MEASURE_STEPS, str(text_tokens), json.dumps(MEASURED)],
                            capture_output=True, text=True, env=MEASURING, timeout=600)
    assert result.returncode == 0, result.stderr
    measured = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [(m["base"], m["checkpointing"]) for m in measured] == [(b, c) for b, c, _ in MEASURED]
    for m, (_, _, resolution) in zip(measured, MEASURED):
        # The text the estimate counts is the text measured (SD's CLIP encoders read 77 tokens at any length).
        assert base_info(m["base"]).max_sequence_length == text_tokens or base_family(m["base"]).denoiser == "unet"
        config = load_config(tiny_config(model={"base": m["base"]}, data={"resolution": resolution},
                                         train={"gradient_checkpointing": m["checkpointing"], "rank": 4,
                                                "target_modules": "attention"}))
        peak = m["held"] + m["step"]
        predicted = estimate(config, "no").total * 2**30
        what = f"{m['base']}, checkpointing {m['checkpointing']}: estimate {predicted / 2**20:.1f} MB, " \
               f"measured {peak / 2**20:.1f} MB"
        print(what)
        assert abs(predicted - peak) <= 0.2 * peak, what


def test_target_sets_adapt_the_layers_they_name_on_flux_dev():
    """Counted with peft on FLUX.1-dev's transformer built on the meta device: `diffusers` is the default layer
    list of diffusers' train_dreambooth_lora_flux.py (attention plus the double blocks' feed-forward)."""
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel
    from peft import LoraConfig

    from lookalike.models.families.flux1 import FLUX_TRANSFORMER
    from lookalike.models.lora import add_lora

    def adapted(target) -> set[str]:
        with init_empty_weights():
            model = FluxTransformer2DModel.from_config(FLUX_TRANSFORMER)
            if isinstance(target, str):
                add_lora(model, 4, 4.0, target)
            else:  # the reference script's own list, as peft matches it
                model.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=target))
        return {name.removesuffix(".lora_A") for name, _ in model.named_modules() if name.endswith(".lora_A")}

    reference = adapted(["attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "attn.add_q_proj",
                         "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                         "ff_context.net.2"])
    assert len(reference) == 342 and adapted("diffusers") == reference
    assert len(adapted("attention")) == 266 and len(adapted("attention+mlp")) == 418


def test_a_sharded_run_holds_its_share_of_the_model_and_the_estimate_says_how_many_gpus_fit(tiny_config):
    from lookalike.train.memory import fitting_lines

    config = load_config(tiny_config(model={"base": "qwen-image"}, data={"resolution": 1024},
                                     train={"gradient_checkpointing": True}))
    whole = estimate(config, "bf16")
    sharded = config.model_copy(update={"train": config.train.model_copy(update={"shard": True})})
    half = estimate(sharded, "bf16", whole.counts, processes=2)
    assert half.weights == pytest.approx(whole.weights / 2) and half.optimizer == pytest.approx(whole.optimizer / 2)
    assert half.activations == whole.activations, "each process computes its own examples whole"
    # Qwen-Image (20B) in bf16 does not fit a 24 GB GPU: quantised it does, and unquantised across 2 of them.
    lines = fitting_lines(config, "bf16", whole, 24.0)
    assert lines[0] == "does not fit a 24 GB GPU as configured; it fits with (fewest changes first):"
    assert lines[-1].startswith("unquantised, sharded across 2 such GPUs: train.shard=true, "
                                "train.gradient_checkpointing=true, --processes 2: ~")
    assert fitting_lines(sharded, "bf16", half, 24.0, processes=2) == ["fits a 24 GB GPU as configured"]
    assert fitting_lines(config, "bf16", whole, 4.0)[-1].startswith("nor sharded across 8 such GPUs")


def test_sharding_is_refused_where_it_cannot_work(tiny_config):
    from lookalike.errors import LookalikeError
    from lookalike.train.trainer import train

    with pytest.raises(LookalikeError, match="shard = true cannot be combined with base_quantization = 'int8'"):
        load_config(tiny_config(train={"shard": True, "base_quantization": "int8"}))
    with pytest.raises(LookalikeError, match="train.shard = true splits the model across processes, and this run "
                                             "has one: train with --processes N"):
        train(load_config(tiny_config(train={"shard": True})), "alone")


def test_estimate_is_within_5_percent_of_every_step_measured_on_a_gpu(tiny_config):
    """The GPU's own figures (bench/gpu_figures.json, full-size FLUX.1-dev): the autocast and dequantization
    factors were read off three of these rows (bf16, nf4 and fp8 at 1024 px without checkpointing); the other four
    check them."""
    from pathlib import Path

    figures = json.loads((Path(__file__).parent.parent / "bench" / "gpu_figures.json").read_text())
    counts = None
    for row in figures["train_steps"]:
        config = load_config(tiny_config(model={"base": "flux-dev"}, data={"resolution": row["resolution"]}, train={
            "gradient_checkpointing": row["checkpointing"],
            "base_quantization": "none" if row["base"] == "bf16" else row["base"]}))
        estimated = estimate(config, "bf16", counts)
        counts = estimated.counts
        assert estimated.total * 2**30 / 1e9 == pytest.approx(row["peak_gb"], rel=0.05), row
