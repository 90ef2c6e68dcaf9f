"""What a training run will need in accelerator memory, estimated before anything is loaded (`train --dry-run`),
and the settings an out-of-memory error suggests.

Weights and LoRA are counted exactly, from the transformer built on the meta device (no memory, no weights).
Activations are an estimate: about 17 values per token and hidden unit kept per transformer block for the
backward pass (Korthikanti et al. 2022, with memory-efficient attention, so nothing grows with tokens squared);
a checkpointed block keeps only its input. Measure the real figure with bench/gpu_train_step.py.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from lookalike.config import StudyConfig

GB = 2**30
VALUES_PER_BLOCK = 17  # kept activations per token and hidden unit in one block (see above)
BYTES = {"no": 4, "bf16": 2, "fp16": 2}


@dataclass(frozen=True)
class Estimate:
    weights: float  # GB, the frozen transformer in the compute precision
    lora: float  # GB, the trainable LoRA (float32)
    optimizer: float  # GB, its gradients and AdamW's two moments
    activations: float  # GB, kept for the backward pass
    parameters: int
    lora_parameters: int

    @property
    def total(self) -> float:
        return self.weights + self.lora + self.optimizer + self.activations

    def lines(self) -> list[str]:
        return [f"transformer weights  {size(self.weights)}  ({self.parameters / 1e6:,.1f} M parameters)",
                f"LoRA                 {size(self.lora)}  ({self.lora_parameters / 1e6:,.2f} M parameters)",
                f"gradients + AdamW    {size(self.optimizer)}",
                f"activations (est.)   {size(self.activations)}",
                f"total                {size(self.total)}  (plus the framework's own, about 1 GB on a GPU)"]


def size(gigabytes: float) -> str:
    return f"{gigabytes:8.2f} GB" if gigabytes >= 0.1 else f"{gigabytes * 1024:8.2f} MB"


def transformer_config(config: StudyConfig) -> dict:
    """The transformer's architecture without loading (or, for a known hub model, downloading) weights."""
    from lookalike.models.base import FLUX_TRANSFORMER, resolve_base

    if config.model.base in ("flux-dev", "flux-schnell"):
        return dict(FLUX_TRANSFORMER, guidance_embeds=config.model.base == "flux-dev")
    folder = resolve_base(config.model.base, config.model.revision)  # tiny: built offline; else a local folder
    architecture = json.loads((folder / "transformer" / "config.json").read_text())
    return {k: v for k, v in architecture.items() if not k.startswith("_")}


def count_parameters(architecture: dict, rank: int, alpha: float, target: str) -> tuple[int, int]:
    """(frozen, LoRA) parameter counts of the transformer with the run's adapter, built on the meta device."""
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel

    from lookalike.models.lora import add_lora

    with init_empty_weights():
        model = FluxTransformer2DModel.from_config(architecture)
        add_lora(model, rank, alpha, target)
    lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return sum(p.numel() for p in model.parameters()) - lora, lora


def estimate(config: StudyConfig, precision: str, counts: tuple[int, int] | None = None) -> Estimate:
    """The run's memory with its settings; `precision` is the resolved mixed precision (no, bf16, fp16)."""
    from lookalike.models.base import base_info

    t = config.train
    architecture = transformer_config(config)
    frozen, lora = counts or count_parameters(architecture, t.rank, t.lora_alpha, t.target_modules)
    hidden = architecture["num_attention_heads"] * architecture["attention_head_dim"]
    blocks = architecture["num_layers"] + architecture["num_single_layers"]
    text = config.model.max_sequence_length or base_info(config.model.base).max_sequence_length
    tokens = (config.data.resolution // 16) ** 2 + text
    per_value = BYTES[precision]
    full_block = VALUES_PER_BLOCK * tokens * hidden * per_value * t.batch_size
    block_input = tokens * hidden * per_value * t.batch_size
    if t.gradient_checkpointing:
        checkpointed = len(range(0, blocks, t.gradient_checkpointing_every))
        activations = checkpointed * block_input + (blocks - checkpointed) * full_block + full_block
    else:
        activations = blocks * full_block
    optimizer_bytes = 4 + (2 if t.optimizer == "adamw8bit" else 8)  # float32 gradient + the two moments
    return Estimate(frozen * per_value / GB, lora * 4 / GB, lora * optimizer_bytes / GB, activations / GB,
                    frozen, lora)


def lighter_settings(config: StudyConfig, precision: str, base: Estimate) -> list[tuple[str, float]]:
    """Settings that need less memory than the config's (whose estimate is `base`), each with its estimate,
    least memory last."""
    t = config.train
    counts = (base.parameters, base.lora_parameters)  # the same model: counted once
    options = []
    if not t.gradient_checkpointing:
        options.append(("train.gradient_checkpointing=true", {"gradient_checkpointing": True}))
    elif t.gradient_checkpointing_every > 1:
        options.append(("train.gradient_checkpointing_every=1", {"gradient_checkpointing_every": 1}))
    if t.batch_size > 1:
        options.append(("train.batch_size=1 (raise gradient_accumulation_steps to keep the batch)",
                        {"batch_size": 1}))
    lighter = []
    for label, change in options:
        changed = config.model_copy(update={"train": t.model_copy(update=change)})
        lighter.append((label, estimate(changed, precision, counts).total))
    if config.data.resolution > 512:
        smaller = config.model_copy(update={"data": config.data.model_copy(update={"resolution": 512})})
        lighter.append(("data.resolution=512", estimate(smaller, precision, counts).total))
    return sorted(lighter, key=lambda item: -item[1])


def out_of_memory_message(config: StudyConfig, precision: str) -> str:
    """What to say when the accelerator runs out of memory: the estimate, and settings estimated to need less."""
    base = estimate(config, precision)
    lighter = "; ".join(f"{label} (~{size(gb).strip()})" for label, gb in lighter_settings(config, precision, base))
    return (f"out of accelerator memory: this run is estimated to need ~{base.total:.1f} GB at "
            f"{config.data.resolution} px, batch {config.train.batch_size}. "
            + (f"Estimated to need less: {lighter}." if lighter else "No lighter setting is known to lookalike."))
