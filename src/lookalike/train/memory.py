"""What a training run will need in accelerator memory, estimated before anything is loaded (`train --dry-run`),
and the settings an out-of-memory error suggests.

Weights and LoRA are counted exactly, from the transformer built on the meta device (no memory, no weights);
quantised linear weights at their packed size. Activations are counted by the family, from figures measured
on its blocks (bench/activation_figures.py), then scaled by what a GPU measured under bf16 autocast; quantised
layers' dequantized weights come on top. Check a GPU's own figure with bench/gpu_train_step.py.
"""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass

from lookalike.config import StudyConfig
from lookalike.data.crop import largest_bucket_share
from lookalike.errors import LookalikeError
from lookalike.models.base import max_sequence_length, resolve_base, training_resolution, training_sides
from lookalike.models.families import FAMILIES, KNOWN_BASES, base_family
from lookalike.models.lora import add_lora

GB = 2**30
FRAMEWORK_GB = 1.0  # what the framework itself takes on a GPU (CUDA context, kernels), beyond the estimate
BYTES = {"no": 4, "bf16": 2, "fp16": 2}
# Bytes per quantised linear weight: NF4 packs two per byte with a float32 scale per 64; int8 and fp8 one
# byte, with a scale per output row (negligible).
QUANTIZED_BYTES = {"nf4": 0.5 + 4 / 64, "int8": 1.0, "fp8": 1.0}
# Measured on a GPU (bench/gpu_run.sh: FLUX.1-dev, rank-16 attention LoRA, an H200), for each kind of base: under
# bf16 autocast the blocks keep this many times the values their float32 count finds (the counts are made in float32
# on the CPU): autocast's bf16 copies of each adapted layer's input for the float32 LoRA, float32 copies for the norms
# and softmax, and for nf4 bitsandbytes' own bf16 copy of each layer's input. bf16: 26.5 GB of activations measured
# for 19.5 counted at 1024 px; with checkpointing 2.4 for 2.3, so there the factor overstates, by 2.6% of the run's
# total. nf4: 1.85 fits all four measurements (512 and 1024 px, with and without checkpointing) within 3.5% of the
# total. int8 was not measured; it takes fp8's figures (both are torchao's weight-only layers). The measurements:
# bench/gpu_figures.json. They were measured while peft still cast each LoRA layer's input to float32; the LoRA
# layers now share their inputs (models/lora.share_lora_inputs), so these factors overstate until a GPU measures
# them again.
ACTIVATIONS_UNDER_AUTOCAST = {"none": 1.36, "int8": 1.36, "fp8": 1.36, "nf4": 1.85}
# torchao's weight-only int8 and fp8 layers also keep a dequantized copy of their weight for the backward pass
# (counted on the CPU too): with an fp8 base, 17.3 GB more than bf16's at 1024 px, 0.73 of the linear weights in bf16.
DEQUANTIZED_KEPT = 0.73
ADAPTER_NAMES = {"lora": "LoRA", "dora": "DoRA", "lokr": "LoKr"}  # train.adapter as the estimate's lines name it


@dataclass(frozen=True)
class Counts:
    frozen: int  # every frozen parameter
    linear: int  # of which weights of linear layers: what a quantised base packs
    lora: int
    in_blocks: int = 0  # of the frozen ones, those in the blocks: what train.offload keeps in CPU memory
    largest_block: int = 0  # the frozen parameters of the largest block
    # A LoKr's weight changes: the weights of the layers it adapts, per block in the model's order, outside them, and
    # the largest layer's.
    changes_by_block: tuple[int, ...] = ()
    changes_outside: int = 0
    largest_change: int = 0


@dataclass(frozen=True)
class Estimate:
    weights: float  # GB, the frozen denoiser: compute precision, or quantised linear weights
    lora: float  # GB, the trainable LoRA (float32)
    optimizer: float  # GB, its gradients and AdamW's two moments
    activations: float  # GB, kept for the backward pass and working values
    counts: Counts
    changes: float = 0.0  # GB, the whole weight changes a LoKr builds in the forward pass and keeps for the backward
    dequantized: float = 0.0  # GB, the dequantized weights int8 and fp8 layers keep for the backward pass
    quantization: str = "none"
    shards: int = 1  # processes the model is sharded across (train.shard): weights, LoRA and AdamW per process
    denoiser: str = "transformer"  # what the weights are of: the family's transformer or UNet
    offloaded: float = 0.0  # GB of the blocks' weights kept in CPU memory (train.offload), not in `weights`
    text_encoders: float = 0.0  # GB, the text encoders a run trains a LoRA on (train.train_text_encoder), held too
    text_encoder_parameters: int = 0
    adapter: str = "LoRA"  # what trains: LoRA, DoRA or LoKr (train.adapter)

    @property
    def total(self) -> float:
        return (self.weights + self.lora + self.optimizer + self.activations + self.changes + self.dequantized
                + self.text_encoders)

    def lines(self) -> list[str]:
        quantized = "" if self.quantization == "none" else f", linear weights in {self.quantization}"
        quantized += f"; each of {self.shards} processes holds 1/{self.shards}" if self.shards > 1 else ""
        quantized += (f"; the blocks' {size(self.offloaded).strip()} in CPU memory, one block at a time here"
                      if self.offloaded else "")
        return [f"{self.denoiser + ' weights':20s} {size(self.weights)}  ({self.counts.frozen / 1e6:,.1f} M parameters"
                f"{quantized})",
                f"{self.adapter:21s}{size(self.lora)}  ({self.counts.lora / 1e6:,.2f} M parameters)",
                f"gradients + AdamW    {size(self.optimizer)}",
                f"activations (est.)   {size(self.activations)}",
                *([f"LoKr weight changes  {size(self.changes)}  (each adapted layer's, built for its forward pass)"]
                  if self.changes else []),
                *([f"dequantized weights  {size(self.dequantized)}  (what {self.quantization} layers keep for the "
                   "backward pass)"] if self.dequantized else []),
                *([f"text encoders        {size(self.text_encoders)}  ({self.text_encoder_parameters / 1e6:,.1f} M "
                   "parameters, with their LoRA and its AdamW state)"] if self.text_encoders else []),
                f"total                {size(self.total)}  (plus the framework's own, about {FRAMEWORK_GB:.0f} GB on a "
                "GPU)"]


def fits(total: float, gpu_memory: float) -> bool:
    """Whether an estimate's total fits a GPU of `gpu_memory` GB, the framework's own memory included."""
    return total + FRAMEWORK_GB <= gpu_memory


def parse_gpu_memory(text: str) -> float:
    """A GPU's memory as a user writes it (24GB, 24 GiB, 80G, 24) in GB of 2^30 bytes, as GPUs are sized."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(GB|GiB|G)?\s*", text, re.IGNORECASE)
    if match is None or float(match.group(1)) <= 0:
        raise LookalikeError(f"--gpu-memory: {text!r} is not a memory size like 24GB")
    return float(match.group(1))


def size(gigabytes: float) -> str:
    return f"{gigabytes:8.2f} GB" if gigabytes >= 0.1 else f"{gigabytes * 1024:8.2f} MB"


def transformer_config(config: StudyConfig) -> dict:
    """The transformer's architecture without loading any weights: a hub base's as published (stored with the
    base, nothing downloaded), a local or tiny folder's from its config file."""
    info = KNOWN_BASES.get(config.model.base)
    if info is not None and info.architecture is not None:
        return dict(info.architecture)
    denoiser = base_family(config.model.base).denoiser
    path = resolve_base(config.model.base, config.model.revision) / denoiser / "config.json"  # tiny: built
    return {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}


def text_encoder_parameters(config: StudyConfig) -> tuple[int, int]:
    """(frozen, LoRA) parameters of the text encoders a run that trains them (train.train_text_encoder) holds, the
    frozen ones beside them included (FLUX.1's T5), built on the meta device from their configs: a hub base's as
    published, a local or tiny folder's own."""
    from accelerate import init_empty_weights

    from lookalike.train.text_encoders import text_encoder_lora_config

    family = base_family(config.model.base)
    frozen = lora = 0
    for component in family.published_text_encoders:
        cls = family.component_class(component)
        if config.model.base in KNOWN_BASES and KNOWN_BASES[config.model.base].repo is not None:
            settings = cls.config_class(**family.published_text_encoders[component])
        else:
            settings = cls.config_class.from_pretrained(resolve_base(config.model.base) / component)
        with init_empty_weights():
            model = cls(settings).requires_grad_(False)
            if component in family.trainable_text_encoders:
                model.add_adapter(text_encoder_lora_config(config.train))
        lora += sum(p.numel() for p in model.parameters() if p.requires_grad)
        frozen += sum(p.numel() for p in model.parameters() if not p.requires_grad)
    return frozen, lora


def count_parameters(architecture: dict, rank: int, alpha: float, target: str, family: str = "flux1",
                     adapter: str = "lora", lokr_factor: int = -1, layer_filter: str | None = None) -> Counts:
    """Parameter counts of the family's denoiser with the run's adapter, built on the meta device."""
    import torch
    from accelerate import init_empty_weights

    with init_empty_weights():
        model = FAMILIES[family].component_class(FAMILIES[family].denoiser).from_config(architecture)
        add_lora(model, rank, alpha, target, adapter=adapter, lokr_factor=lokr_factor, layer_filter=layer_filter)
    lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    # Under a LoRA the frozen linear layer is its base_layer, a plain nn.Linear as well.
    linear = sum(m.weight.numel() for m in model.modules() if type(m) is torch.nn.Linear and
                 not m.weight.requires_grad)
    kinds = FAMILIES[family].checkpointed_block_types(model)
    block_modules = [m for m in model.modules() if type(m).__name__ in kinds]
    blocks = [sum(p.numel() for p in m.parameters() if not p.requires_grad) for m in block_modules]
    changes = [sum(lokr_changes(block)) for block in block_modules]
    everywhere = lokr_changes(model)
    return Counts(sum(p.numel() for p in model.parameters()) - lora, linear, lora, sum(blocks), max(blocks, default=0),
                  tuple(changes), sum(everywhere) - sum(changes), max(everywhere, default=0))


def lokr_changes(module) -> list[int]:
    """The weight sizes of the layers a LoKr adapts in `module` (none for another adapter): the sizes of the
    weight changes it builds."""
    from peft.tuners.lokr.layer import LoKrLayer

    return [m.get_base_layer().weight.numel() for m in module.modules() if isinstance(m, LoKrLayer)]


def changes_held(counts: Counts, checkpointing: bool, every: int) -> int:
    """The LoKr weight-change values held at a training step's peak. Each adapted layer builds its whole change,
    kron(w1, w2), for its forward pass, and keeps it for the backward pass: a kept block holds its layers' changes
    until then; a checkpointed block builds them again when it is recomputed, one block at a time. The backward
    pass makes each change's gradient, one layer at a time, on top."""
    blocks = counts.changes_by_block
    checkpointed = set(range(0, len(blocks), every)) if checkpointing else set()
    kept = sum(changes for index, changes in enumerate(blocks) if index not in checkpointed)
    return (counts.changes_outside + kept + max((blocks[index] for index in checkpointed), default=0) +
            counts.largest_change)


def dequantized_kept(counts: Counts, checkpointing: bool, every: int) -> float:
    """The dequantized weight values int8 and fp8 layers keep at a training step's peak: those of every block
    without checkpointing; with it, those of the blocks not checkpointed and of the one recomputed."""
    kept = counts.linear if not checkpointing else counts.linear * (1 - 1 / every) + counts.largest_block
    return DEQUANTIZED_KEPT * kept


def estimate(config: StudyConfig, precision: str, counts: Counts | None = None, processes: int = 1) -> Estimate:
    """The run's memory per process with its settings; `precision` is the resolved mixed precision (no, bf16,
    fp16); a sharded run's (train.shard) weights, LoRA and AdamW state are split across its `processes`."""
    t = config.train
    shards = processes if t.shard else 1
    family = base_family(config.model.base)
    architecture = transformer_config(config)
    counts = counts or count_parameters(architecture, t.rank, t.lora_alpha, t.target_modules, family.name,
                                        t.adapter, t.lokr_factor, t.layer_filter)
    per_value = BYTES[precision]
    # An offloaded base recomputes every block, as checkpointing every block does.
    checkpointing, every = (True, 1) if t.offload else (t.gradient_checkpointing, t.gradient_checkpointing_every)
    side = max(training_sides(config))  # the largest side a batch trains at (train.extra_resolutions)
    values = family.activation_values(architecture, side, max_sequence_length(config.model), checkpointing, every)
    if config.data.buckets:  # activations grow with the pixels: the largest bucket has a few more than the square
        values *= largest_bucket_share(side, family.pixel_multiple(architecture))
    # Examples in the training forward: prior preservation adds a class example to each subject one, and
    # output_preservation runs each subject one again with its preserved caption.
    examples = t.batch_size * ((2 if config.prior.num_class_images else 1) + (1 if t.output_preservation else 0))
    autocast = 1.0 if precision == "no" else ACTIVATIONS_UNDER_AUTOCAST[t.base_quantization]
    activations = values * per_value * examples * autocast / GB
    changes = changes_held(counts, checkpointing, every) * per_value / GB
    quantized = counts.linear if t.base_quantization != "none" else 0
    weights = (counts.frozen - quantized) * per_value + quantized * QUANTIZED_BYTES.get(t.base_quantization, 0)
    dequantized = dequantized_kept(counts, checkpointing, every) * per_value / GB \
        if t.base_quantization in ("int8", "fp8") else 0.0
    offloaded = 0
    if t.offload:  # the blocks' weights wait in CPU memory; the device holds the rest and one block's at a time
        from lookalike.train.offload import RESIDENT  # (not at the top: it imports torch, which --help must not)

        offloaded = counts.in_blocks * per_value
        weights += RESIDENT * counts.largest_block * per_value - offloaded
    # A float32 gradient, and the optimizer's state: AdamW's two moments (8-bit or float32), Prodigy's four
    # tensors (two moments, its step-size sum and the initial weights); an EMA's float32 copy.
    state = {"adamw": 8, "adamw8bit": 2, "prodigy": 16}[t.optimizer] + (4 if t.ema_decay else 0)
    optimizer_bytes = 4 + state
    text_frozen, text_lora = text_encoder_parameters(config) if t.train_text_encoder else (0, 0)
    text_encoders = (text_frozen * per_value + text_lora * (4 + optimizer_bytes)) / GB
    return Estimate(weights / GB / shards, counts.lora * 4 / GB / shards, counts.lora * optimizer_bytes / GB / shards,
                    activations, counts, changes, dequantized, t.base_quantization, shards, family.denoiser,
                    offloaded / GB, text_encoders, text_frozen, ADAPTER_NAMES[t.adapter])


def lighter_settings(config: StudyConfig, precision: str, base: Estimate, processes: int = 1
                     ) -> list[tuple[str, float]]:
    """Settings that need less memory than the config's (whose estimate is `base`), each with its estimate,
    least memory last."""
    t = config.train
    options = []
    recomputed = t.offload  # an offloaded base recomputes every block already
    if not recomputed and not t.gradient_checkpointing:
        options.append(("train.gradient_checkpointing=true", {"gradient_checkpointing": True}))
    elif not recomputed and t.gradient_checkpointing_every > 1:
        options.append(("train.gradient_checkpointing_every=1", {"gradient_checkpointing_every": 1}))
    if t.batch_size > 1:
        options.append(("train.batch_size=1 (raise gradient_accumulation_steps to keep the batch)",
                        {"batch_size": 1}))
    quantizable = not t.shard and not t.offload  # a sharded or offloaded base is not quantised
    if t.base_quantization == "none" and quantizable:
        options.append(("train.base_quantization=int8 (or fp8)", {"base_quantization": "int8"}))
    if t.base_quantization != "nf4" and quantizable:
        options.append(("train.base_quantization=nf4 (CUDA, bitsandbytes)", {"base_quantization": "nf4"}))
    if len(options) > 1:
        together = {key: value for _, change in options for key, value in change.items()}  # nf4 wins over int8
        options.append(("the train settings above together (with nf4)", together))
    if offloadable(t) and processes == 1:
        options.append(("train.offload=true (the blocks' weights in CPU memory)", {"offload": True}))
    if t.train_text_encoder:
        options.append(("train.train_text_encoder=false (the captions cached, the text encoders unloaded)",
                        {"train_text_encoder": False, "text_encoder_lr": None}))
    lighter = []
    for label, change in options:
        changed = config.model_copy(update={"train": t.model_copy(update=change)})
        # The same model: counted once.
        lighter.append((label, estimate(changed, precision, base.counts, processes).total))
    if max(training_sides(config)) > training_resolution(config):
        fewer = config.model_copy(update={"train": t.model_copy(update={"extra_resolutions": []})})
        lighter.append(("train.extra_resolutions=[]", estimate(fewer, precision, base.counts, processes).total))
    if training_resolution(config) > 512:
        smaller = config.model_copy(update={"train": t.model_copy(update={"resolution": 512})})
        lighter.append(("train.resolution=512", estimate(smaller, precision, base.counts, processes).total))
    return sorted(lighter, key=lambda item: -item[1])


def offloadable(train) -> bool:
    """Whether train.offload could be turned on with these settings (plain weights, one device)."""
    return not train.offload and train.base_quantization == "none" and train.compile is not True and not train.shard


def out_of_memory_message(config: StudyConfig, precision: str, processes: int = 1) -> str:
    """What to say when the accelerator runs out of memory: the estimate, and settings estimated to need less."""
    base = estimate(config, precision, processes=processes)
    lighter = "; ".join(f"{label} (~{size(gb).strip()})"
                        for label, gb in lighter_settings(config, precision, base, processes))
    return (f"out of accelerator memory: this run is estimated to need ~{base.total:.1f} GB at "
            f"{training_resolution(config)} px, batch {config.train.batch_size}. "
            + (f"Estimated to need less: {lighter}." if lighter else "No lighter setting is known to lookalike."))


def settings_that_fit(config: StudyConfig, precision: str, base: Estimate, gpu_memory: float, processes: int = 1
                      ) -> list[tuple[str, float]]:
    """Combinations of the train settings that save memory (checkpointing, batch 1, a quantised base) with which
    the run fits a GPU of `gpu_memory` GB, each with its estimate: the fewest changes first, then the most
    memory (the least given up); the resolution is the study's choice and stays."""
    t = config.train
    factors = []
    if not t.offload and (not t.gradient_checkpointing or t.gradient_checkpointing_every > 1):
        factors.append([{}, {"gradient_checkpointing": True, "gradient_checkpointing_every": 1}])
    if t.batch_size > 1:
        factors.append([{}, {"batch_size": 1}])
    quantizations = {"none": ["int8", "nf4"], "int8": ["nf4"], "fp8": ["nf4"]}.get(t.base_quantization, [])
    lighter_weights = [{"base_quantization": kind} for kind in ([] if t.shard or t.offload else quantizations)]
    if offloadable(t) and processes == 1:  # plain weights, offloaded: the other way to hold less of the base
        lighter_weights.append({"offload": True})
    factors.append([{}] + lighter_weights)
    fitting = []
    for combination in itertools.product(*factors):
        change = {key: value for part in combination for key, value in part.items()}
        if not change:
            continue
        if change.get("offload") and "gradient_checkpointing" in change:
            continue  # the offload recomputes every block itself: the same as offloading alone
        total = estimate(config.model_copy(update={"train": t.model_copy(update=change)}), precision,
                         base.counts, processes).total
        if fits(total, gpu_memory):
            label = ", ".join(f"train.{key}={str(value).lower()}" for key, value in change.items()
                              if key != "gradient_checkpointing_every" or t.gradient_checkpointing)
            fitting.append((len(combination) - combination.count({}), -total, label, total))
    return [(label, total) for _, _, label, total in sorted(fitting)]


def processes_that_fit(config: StudyConfig, precision: str, counts: Counts, gpu_memory: float
                       ) -> tuple[int, float] | None:
    """The fewest GPUs of `gpu_memory` GB (2, 4 or 8) across which the unquantised base, sharded and with
    gradient checkpointing, fits, with the estimate per GPU; None if not even 8."""
    sharded = config.model_copy(update={"train": config.train.model_copy(update={
        "shard": True, "gradient_checkpointing": True, "gradient_checkpointing_every": 1,
        "base_quantization": "none", "compile": False})})
    for processes in (2, 4, 8):
        total = estimate(sharded, precision, counts, processes).total
        if fits(total, gpu_memory):
            return processes, total
    return None


def fitting_lines(config: StudyConfig, precision: str, base: Estimate, gpu_memory: float, processes: int = 1
                  ) -> list[str]:
    """What `--dry-run --gpu-memory` says: whether the run fits, else the settings with which it would, on one
    GPU and sharded across several."""
    if fits(base.total, gpu_memory):
        return [f"fits a {gpu_memory:g} GB GPU as configured"]
    fitting = settings_that_fit(config, precision, base, gpu_memory, processes)
    lines = ([f"does not fit a {gpu_memory:g} GB GPU as configured; it fits with (fewest changes first):"] +
             [f"  {label}: ~{size(total).strip()}" for label, total in fitting[:3]] if fitting else
             [f"does not fit a {gpu_memory:g} GB GPU with any setting of one process"])
    # A run that trains its text encoders holds them whole in every process: it is not sharded.
    sharded = None if config.train.train_text_encoder else processes_that_fit(config, precision, base.counts,
                                                                              gpu_memory)
    if sharded is not None:
        lines.append(f"unquantised, sharded across {sharded[0]} such GPUs: train.shard=true, "
                     f"train.gradient_checkpointing=true, --processes {sharded[0]}: ~{size(sharded[1]).strip()} each")
    elif not fitting:
        lines.append("nor sharded across 8 such GPUs: use bigger GPUs or a lower train.resolution")
    return lines



def dry_run_lines(study: StudyConfig, gpu_memory: float | None, processes: int = 1) -> list[str]:
    """What `train --dry-run` says, before anything is loaded: the run's settings, its memory by part, lighter
    settings with theirs, and with `gpu_memory` whether it fits that GPU and what would."""
    from lookalike.models.quantize import check_quantization
    from lookalike.train.trainer import resolve_mixed_precision

    # For a GPU named by its memory, 'auto' means what it means on today's GPUs: bf16.
    setting = study.train.mixed_precision
    precision = "bf16" if gpu_memory is not None and setting == "auto" else resolve_mixed_precision(setting)
    sides = " and ".join(str(side) for side in training_sides(study))
    t = study.train
    lines = [f"train --dry-run: {study.model.base}, {sides} px, batch {t.batch_size}, rank {t.rank}, precision "
             f"{precision}, gradient checkpointing {t.gradient_checkpointing or t.offload}"
             + (f", {processes} processes" if processes > 1 else "") + (", sharded" if t.shard else "")
             + (", offloaded" if t.offload else "")]
    base = estimate(study, precision, processes=processes)
    lines += ["  " + line for line in base.lines()]
    lines += [f"  with {label}: ~{size(gigabytes).strip()}"
              for label, gigabytes in lighter_settings(study, precision, base, processes)]
    lines += ["  " + line for line in fitting_lines(study, precision, base, gpu_memory, processes)] \
        if gpu_memory is not None else []
    try:
        check_quantization(t.base_quantization)
    except LookalikeError as error:  # the estimate still holds for a machine that can run it
        lines.append(f"  note: {error}")
    if t.offload and not study.generate.offload:
        lines.append("  note: to draw the study's images on a GPU too small for the base, set [generate] offload = "
                     "true as well")
    if t.init_lora is not None:  # what the file alone can tell, checked now rather than after loading
        from lookalike.train.init_lora import read_start

        tensors, _ = read_start(t.init_lora, t.init_lora, t.rank, study.model.base, t.train_text_encoder)
        lines.append(f"  starts from {t.init_lora} ({len(tensors) // 2} layers)")
    return lines
